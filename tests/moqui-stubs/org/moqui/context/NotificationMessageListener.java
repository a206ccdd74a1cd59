package org.moqui.context;

/** org.moqui.context.NotificationMessageListener. */
public interface NotificationMessageListener {
    void init(ExecutionContextFactory ecf);
    void destroy();
    void onMessage(NotificationMessage nm);
}
