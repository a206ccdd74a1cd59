/*
 * Forwards every Moqui NotificationMessage to wsgate, which delivers it to the users'
 * /notws WebSockets on whichever gateway node holds them.
 *
 * POST {WSGATE_ADMIN_URL}/api/v1/notifications
 *   Authorization: Bearer {WSGATE_API_TOKEN}
 *   {"userIds": [nm.notifyUserIds...], "notification": nm.wrappedMessageJson}
 *
 * Asynchronous with a short timeout: onMessage never waits for wsgate; failures are
 * logged (without the token) and the notification is still persisted by Moqui when
 * persistOnSend is set, so clients see it on their next load.
 */
package wsgate.moqui

import groovy.transform.CompileStatic
import org.moqui.context.ExecutionContextFactory
import org.moqui.context.NotificationMessage
import org.moqui.context.NotificationMessageListener
import org.slf4j.Logger
import org.slf4j.LoggerFactory

@CompileStatic
class WsgateNotificationListener implements NotificationMessageListener {
    protected final static Logger logger = LoggerFactory.getLogger(WsgateNotificationListener.class)

    private WsgateClient client

    WsgateNotificationListener() { }
    WsgateNotificationListener(WsgateClient client) { this.client = client }

    WsgateClient getClient() { return client }

    @Override
    void init(ExecutionContextFactory ecf) {
        if (client == null) client = WsgateClient.fromConfig()
        logger.info("wsgate notification listener publishing to ${client.adminUrl}")
    }

    @Override
    void onMessage(NotificationMessage nm) {
        if (client == null) return
        Set<String> userIds = nm.getNotifyUserIds()
        if (userIds == null || userIds.isEmpty()) return
        try {
            client.publishNotification(userIds, nm.getWrappedMessageJson())
        } catch (Throwable t) {
            logger.warn("wsgate: could not publish notification ${nm.getNotificationMessageId()} (topic ${nm.getTopic()}): ${t.class.simpleName}: ${t.message}")
        }
    }

    @Override
    void destroy() {
        client?.close()
        client = null
    }
}
