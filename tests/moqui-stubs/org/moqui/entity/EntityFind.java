package org.moqui.entity;

/** Subset of org.moqui.entity.EntityFind (EntityException is unchecked). */
public interface EntityFind {
    EntityFind condition(String fieldName, Object value);
    EntityFind useCache(Boolean useCache);
    EntityFind disableAuthz();
    EntityFind limit(Integer limit);
    EntityValue one();
    EntityList list();
}
