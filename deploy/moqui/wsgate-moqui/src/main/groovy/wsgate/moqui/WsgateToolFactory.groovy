/*
 * Registers WsgateNotificationListener when Moqui starts (see this component's
 * MoquiConf.xml) and makes the client available as ec.factory.getTool("Wsgate", WsgateClient.class)
 * for services such as GrowERP's chat (pushChat, isUserOnline).
 */
package wsgate.moqui

import groovy.transform.CompileStatic
import org.moqui.context.ExecutionContextFactory
import org.moqui.context.ToolFactory
import org.slf4j.Logger
import org.slf4j.LoggerFactory

@CompileStatic
class WsgateToolFactory implements ToolFactory<WsgateClient> {
    protected final static Logger logger = LoggerFactory.getLogger(WsgateToolFactory.class)

    private WsgateClient client

    @Override String getName() { return "Wsgate" }

    @Override
    void init(ExecutionContextFactory ecf) {
        if (!WsgateClient.setting("WSGATE_ADMIN_URL")) {
            logger.warn("WSGATE_ADMIN_URL is not set: notifications are not forwarded to wsgate")
            return
        }
        client = WsgateClient.fromConfig()
        ecf.registerNotificationMessageListener(new WsgateNotificationListener(client))
    }

    @Override
    WsgateClient getInstance(Object... parameters) {
        if (client == null) throw new IllegalStateException("wsgate is not configured (WSGATE_ADMIN_URL, WSGATE_API_TOKEN)")
        return client
    }

    @Override
    void destroy() {
        // The listener closes the shared client in its destroy(); closing twice is harmless.
        client?.close()
    }
}
