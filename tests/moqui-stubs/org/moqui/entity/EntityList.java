package org.moqui.entity;

import java.util.List;

/** Subset of org.moqui.entity.EntityList. */
public interface EntityList extends List<EntityValue>, Iterable<EntityValue> {
}
