package org.moqui.context;

import org.moqui.entity.EntityFacade;

/** Subset of org.moqui.context.ExecutionContext. */
public interface ExecutionContext {
    ExecutionContextFactory getFactory();
    UserFacade getUser();
    L10nFacade getL10n();
    EntityFacade getEntity();
    TransactionFacade getTransaction();
}
