package org.moqui.context;

import groovy.lang.Closure;
import jakarta.transaction.Synchronization;

/** Subset of org.moqui.context.TransactionFacade (its exceptions are unchecked). */
public interface TransactionFacade {
    Object runRequireNew(Integer timeout, String rollbackMessage, Closure closure);
    boolean isTransactionInPlace();
    Synchronization getActiveSynchronization(String syncName);
    void putAndEnlistActiveSynchronization(String syncName, Synchronization sync);
}
