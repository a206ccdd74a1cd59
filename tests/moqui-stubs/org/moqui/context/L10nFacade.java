package org.moqui.context;

/** Subset of org.moqui.context.L10nFacade. */
public interface L10nFacade {
    String format(Object value, String format);
}
