/*
 * What the component's service, SECAs and EECAs run (see service/wsgate/WsgateServices.xml,
 * service/WsgateChat.secas.xml and entity/WsgateRevocation.eecas.xml). Kept in a class rather
 * than inline scripts so that it is compiled and checked with the rest of the component.
 *
 * - whoAmI: the user Moqui authenticated on the current request (GET /rest/s1/wsgate/whoami).
 * - pushChatMessage: a GrowERP ChatMessage, once committed, to the room's other members through
 *   POST /api/v1/chat (replaces ChatEndpoint.pushToMembers, whose sockets are now on wsgate).
 * - refreshChatPresence: before the unanswered-chat mail sweep, marks the unread members that
 *   have a chat WebSocket open on any wsgate node as seen now (replaces ChatEndpoint.isUserOnline).
 * - revokeUser: once the transaction commits, POST /api/v1/revocations {"userId": ...}.
 *
 * Nothing here ever fails the caller's transaction: wsgate being away is logged and skipped.
 */
package wsgate.moqui

import groovy.transform.CompileStatic
import jakarta.transaction.Status
import jakarta.transaction.Synchronization
import org.moqui.context.ExecutionContext
import org.moqui.context.TransactionFacade
import org.moqui.entity.EntityList
import org.moqui.entity.EntityValue
import org.slf4j.Logger
import org.slf4j.LoggerFactory

import java.sql.Timestamp
import java.util.concurrent.CompletableFuture

@CompileStatic
class WsgateHooks {
    protected final static Logger logger = LoggerFactory.getLogger(WsgateHooks.class)

    /** The format GrowERP's get#ChatMessage gives creationDate (a string, read by the app as UTC). */
    static final String CHAT_DATE_FORMAT = "yyyy-MM-dd HH:mm"
    /** The unanswered-chat sweep reads at most this many unread members per run. */
    static final int PRESENCE_SWEEP_LIMIT = 500

    /** The wsgate client, or null (logged) when the component is not configured. */
    static WsgateClient client(ExecutionContext ec) {
        try {
            return ec.getFactory().getTool("Wsgate", WsgateClient.class)
        } catch (Throwable t) {
            logger.warn("wsgate is not available (${t.class.simpleName}): set WSGATE_ADMIN_URL and WSGATE_API_TOKEN")
            return null
        }
    }

    /**
     * {"userId": ..., "ownerPartyId": ...} for the user Moqui authenticated on this request; empty
     * when nobody is (the REST resource answers 401 before this runs). ownerPartyId is GrowERP's
     * owner party of the user's company (Party.ownerPartyId of the user's party), omitted when
     * there is none or GrowERP is not installed. Reads only, through the entity cache.
     */
    static Map<String, Object> whoAmI(ExecutionContext ec) {
        Map<String, Object> out = new LinkedHashMap<String, Object>()
        String userId = ec.getUser().getUserId()
        if (userId == null || userId.isEmpty()) return out
        out.put("userId", userId)
        String ownerPartyId = ownerPartyOf(ec, ec.getUser().getUserAccount())
        if (ownerPartyId) out.put("ownerPartyId", ownerPartyId)
        return out
    }

    static String ownerPartyOf(ExecutionContext ec, EntityValue userAccount) {
        if (userAccount == null) return null
        String partyId = userAccount.getString("partyId")
        if (!partyId) return null
        try {
            EntityValue party = ec.getEntity().find("mantle.party.Party").condition("partyId", partyId)
                    .useCache(true).disableAuthz().one()
            // ownerPartyId is GrowERP's extension of mantle's Party
            if (party == null || !party.isField("ownerPartyId")) return null
            return party.getString("ownerPartyId") ?: null
        } catch (Throwable t) {
            // no mantle / GrowERP in this runtime: the tenant is optional
            logger.debug("wsgate whoami: no owner party for ${partyId}: ${t.class.simpleName}")
            return null
        }
    }

    /**
     * Sends a committed growerp.general.ChatMessage to every other member of its room, with the
     * fields GrowERP's own push has plus creationDate in GrowERP's string format. Returns the
     * pending HTTP status (null when there is nobody to send to or wsgate is not configured).
     */
    static CompletableFuture<Integer> pushChatMessage(ExecutionContext ec, String chatMessageId, String chatRoomId,
                                                      String fromUserId, String content) {
        if (!chatRoomId) return null
        WsgateClient wsgate = client(ec)
        if (wsgate == null) return null
        List<String> userIds = roomMembersExcept(ec, chatRoomId, fromUserId)
        if (userIds.isEmpty()) return null
        Map<String, Object> chatMessage = new LinkedHashMap<String, Object>()
        chatMessage.put("chatRoom", [chatRoomId: chatRoomId])
        if (chatMessageId) chatMessage.put("chatMessageId", chatMessageId)
        chatMessage.put("fromUserId", fromUserId)
        EntityValue stored = chatMessageId ? ec.getEntity().find("growerp.general.ChatRoomAndMessages")
                .condition("chatMessageId", chatMessageId).disableAuthz().one() : null
        String fromUserFullName = stored?.getString("fromUserFullName")
        if (fromUserFullName) chatMessage.put("fromUserFullName", fromUserFullName)
        chatMessage.put("content", content != null ? content : stored?.getString("content"))
        Timestamp created = stored?.getTimestamp("lastUpdatedStamp") ?: ec.getUser().getNowTimestamp()
        chatMessage.put("creationDate", ec.getL10n().format(created, CHAT_DATE_FORMAT))
        return wsgate.pushChat(userIds, chatMessage)
    }

    static List<String> roomMembersExcept(ExecutionContext ec, String chatRoomId, String exceptUserId) {
        EntityList members = ec.getEntity().find("growerp.general.ChatRoomMember")
                .condition("chatRoomId", chatRoomId).disableAuthz().list()
        LinkedHashSet<String> userIds = new LinkedHashSet<String>()
        for (EntityValue member : members) {
            String userId = member.getString("userId")
            if (userId && userId != exceptUserId) userIds.add(userId)
        }
        return new ArrayList<String>(userIds)
    }

    /**
     * Runs before GrowERP's send#UnansweredChatEmails: asks wsgate which unread members have a
     * chat WebSocket open and sets their ChatRoomMember.lastSeenDate to now, which the sweep
     * already reads as present (GrowERP's website widget records presence the same way). When
     * wsgate cannot be asked nothing changes, so mail goes out as it would for offline users.
     */
    static int refreshChatPresence(ExecutionContext ec) {
        WsgateClient wsgate = client(ec)
        if (wsgate == null) return 0
        EntityList unread = ec.getEntity().find("growerp.general.ChatRoomMember").condition("hasRead", "N")
                .limit(PRESENCE_SWEEP_LIMIT).disableAuthz().list()
        LinkedHashSet<String> userIds = new LinkedHashSet<String>()
        for (EntityValue member : unread) {
            String userId = member.getString("userId")
            if (userId) userIds.add(userId)
        }
        if (userIds.isEmpty()) return 0
        Map<String, Boolean> online
        try {
            online = wsgate.presence(userIds)
        } catch (Throwable t) {
            logger.warn("wsgate presence failed, the unanswered-chat sweep treats everyone as offline: ${t.class.simpleName}: ${t.message}")
            return 0
        }
        Timestamp now = ec.getUser().getNowTimestamp()
        List<Map<String, Object>> seen = new ArrayList<Map<String, Object>>()
        for (EntityValue member : unread) {
            if (Boolean.TRUE == online.get(member.getString("userId")))
                seen.add([chatRoomId: (Object) member.getString("chatRoomId"), userId: (Object) member.getString("userId")])
        }
        if (seen.isEmpty()) return 0
        // In a transaction of its own, committed before the sweep goes on: the sweep runs in a
        // long transaction and updates these rows again from force-new transactions, which would
        // wait on locks this transaction still held.
        ec.getTransaction().runRequireNew(null, "wsgate: could not record chat presence", {
            for (Map<String, Object> pk : seen) {
                EntityValue member = ec.getEntity().find("growerp.general.ChatRoomMember")
                        .condition("chatRoomId", pk.chatRoomId).condition("userId", pk.userId)
                        .useCache(false).disableAuthz().one()
                if (member != null) member.set("lastSeenDate", now).update()
            }
        })
        int marked = seen.size()
        return marked
    }

    /** Name of the per-transaction synchronization that collects the users to revoke. */
    static final String REVOKE_SYNC = "wsgate.revokeUsers"

    /**
     * Asks every wsgate node to forget the user's cached identities and close their sockets,
     * after the current transaction commits (before it, a reconnect could still authenticate
     * with the old state and be cached again); at once when there is no transaction. Users
     * revoked several times in one transaction (several keys deleted) are posted once.
     */
    static void revokeUser(ExecutionContext ec, String userId) {
        if (!userId) return
        WsgateClient wsgate = client(ec)
        if (wsgate == null) return
        try {
            TransactionFacade tf = ec.getTransaction()
            if (tf.isTransactionInPlace()) {
                RevokeAfterCommit pending = (RevokeAfterCommit) tf.getActiveSynchronization(REVOKE_SYNC)
                if (pending == null) {
                    pending = new RevokeAfterCommit(wsgate)
                    tf.putAndEnlistActiveSynchronization(REVOKE_SYNC, pending)
                }
                pending.add(userId)
                return
            }
        } catch (Throwable t) {
            logger.warn("wsgate: could not wait for the commit to revoke user ${userId}, revoking now: ${t.class.simpleName}")
        }
        wsgate.revokeUser(userId)
    }

    /** Posts the collected users once the transaction has committed; nothing on a rollback. */
    static class RevokeAfterCommit implements Synchronization {
        private final WsgateClient wsgate
        private final Set<String> userIds = Collections.synchronizedSet(new LinkedHashSet<String>())

        RevokeAfterCommit(WsgateClient wsgate) { this.wsgate = wsgate }

        void add(String userId) { userIds.add(userId) }

        @Override void beforeCompletion() { }

        @Override
        void afterCompletion(int status) {
            if (status != Status.STATUS_COMMITTED) return
            List<String> users
            synchronized (userIds) { users = new ArrayList<String>(userIds) }
            for (String userId : users) wsgate.revokeUser(userId)
        }
    }
}
