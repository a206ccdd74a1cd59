package org.moqui.entity;

/** Subset of org.moqui.entity.EntityFacade. */
public interface EntityFacade {
    EntityFind find(String entityName);
}
