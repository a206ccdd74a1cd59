package org.moqui.entity;

import java.sql.Timestamp;
import java.util.Map;

/** Subset of org.moqui.entity.EntityValue (EntityException is unchecked). */
public interface EntityValue extends Map<String, Object> {
    boolean isField(String name);
    Object get(String name);
    String getString(String name);
    Timestamp getTimestamp(String name);
    EntityValue set(String name, Object value);
    EntityValue update();
}
