package org.moqui.context;

import java.sql.Timestamp;
import org.moqui.entity.EntityValue;

/** Subset of org.moqui.context.UserFacade. */
public interface UserFacade {
    Timestamp getNowTimestamp();
    String getUserId();
    EntityValue getUserAccount();
}
