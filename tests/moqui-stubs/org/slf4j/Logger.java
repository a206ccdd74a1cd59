package org.slf4j;

/** Subset of org.slf4j.Logger. */
public interface Logger {
    void debug(String msg);
    void info(String msg);
    void warn(String msg);
}
