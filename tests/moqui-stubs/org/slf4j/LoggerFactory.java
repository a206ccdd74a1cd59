package org.slf4j;

/** org.slf4j.LoggerFactory.getLogger(Class); the stub logger writes INFO and above to stderr. */
public final class LoggerFactory {
    private LoggerFactory() { }

    public static Logger getLogger(Class<?> clazz) {
        final String name = clazz.getSimpleName();
        return new Logger() {
            public void debug(String msg) { }
            public void info(String msg) { System.err.println("INFO  " + name + " " + msg); }
            public void warn(String msg) { System.err.println("WARN  " + name + " " + msg); }
        };
    }
}
