package org.moqui.context;

import java.util.Set;

/** Subset of org.moqui.context.NotificationMessage. */
public interface NotificationMessage {
    Set<String> getNotifyUserIds();
    String getTopic();
    String getNotificationMessageId();
    String getWrappedMessageJson();
}
