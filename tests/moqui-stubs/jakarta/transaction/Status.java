package jakarta.transaction;

/** The jakarta.transaction.Status constants the component reads. */
public interface Status {
    int STATUS_ACTIVE = 0;
    int STATUS_COMMITTED = 3;
    int STATUS_ROLLEDBACK = 4;
    int STATUS_NO_TRANSACTION = 6;
}
