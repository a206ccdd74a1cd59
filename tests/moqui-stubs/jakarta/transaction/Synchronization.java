package jakarta.transaction;

/** jakarta.transaction.Synchronization. */
public interface Synchronization {
    void beforeCompletion();
    void afterCompletion(int status);
}
