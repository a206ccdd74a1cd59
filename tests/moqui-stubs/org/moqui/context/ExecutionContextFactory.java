package org.moqui.context;

/** Subset of org.moqui.context.ExecutionContextFactory. */
public interface ExecutionContextFactory {
    <V> V getTool(String toolName, Class<V> instanceClass, Object... parameters);
    void registerNotificationMessageListener(NotificationMessageListener nml);
}
