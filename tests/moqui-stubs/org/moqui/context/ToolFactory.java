package org.moqui.context;

/** org.moqui.context.ToolFactory (the methods the component implements). */
public interface ToolFactory<V> {
    default String getName() { return getClass().getSimpleName(); }
    default void init(ExecutionContextFactory ecf) { }
    default void preFacadeInit(ExecutionContextFactory ecf) { }
    V getInstance(Object... parameters);
    default void destroy() { }
    default void postFacadeDestroy() { }
}
