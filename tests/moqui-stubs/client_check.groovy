/*
 * Run by tests/moqui_component.rs against a real wsgate node: drives the component's classes the
 * way Moqui would (WsgateNotificationListener.onMessage, the chat SECA, the presence SECA, the
 * revocation EECA) with an in-memory stand-in for Moqui's ExecutionContext and GrowERP's tables,
 * and prints one result line per step for the test to check:
 *
 *   notify <status>            publish of a NotificationMessage (sentDate a Timestamp), then the
 *                              same through WsgateNotificationListener.onMessage
 *   chat <status>              the chat SECA's push (POST /api/v1/chat)
 *   presence <json>            WsgateClient.presence of the users named in WSGATE_CHECK_PRESENCE
 *   marked <userId,...>        members the presence SECA marked as seen
 *   revoke-deferred <name> <users>  the EECA's pending synchronization and its users
 *   revoke <status>            POST /api/v1/revocations
 *   whoami <json>              what GET /rest/s1/wsgate/whoami answers for alice (party P1 of ACME)
 *   whoami-no-party <json>     ... for a user without a party (plain Moqui)
 *
 * Configuration: WSGATE_ADMIN_URL, WSGATE_API_TOKEN (as in Moqui), WSGATE_CHECK_PRESENCE (a
 * comma-separated list of users).
 */
import groovy.json.JsonOutput
import jakarta.transaction.Status
import jakarta.transaction.Synchronization
import org.moqui.context.*
import org.moqui.entity.*
import wsgate.moqui.*

import java.sql.Timestamp
import java.text.SimpleDateFormat

class Row extends HashMap<String, Object> implements EntityValue {
    List<Row> updated
    Row(Map m, List<Row> updated) { super(m); this.updated = updated }
    boolean isField(String n) { return containsKey(n) }
    Object get(String n) { return super.get(n) }
    String getString(String n) { Object v = super.get(n); return v == null ? null : v.toString() }
    Timestamp getTimestamp(String n) { return (Timestamp) super.get(n) }
    EntityValue set(String n, Object v) { put(n, v); return this }
    EntityValue update() { updated.add(this); return this }
}

class Rows extends ArrayList<EntityValue> implements EntityList { }

class Find implements EntityFind {
    List<Row> table
    Map<String, Object> conds = [:]
    Integer max
    Find(List<Row> table) { this.table = table }
    EntityFind condition(String f, Object v) { conds[f] = v; return this }
    EntityFind useCache(Boolean u) { return this }
    EntityFind disableAuthz() { return this }
    EntityFind limit(Integer l) { max = l; return this }
    EntityList list() {
        Rows out = new Rows()
        for (Row r : table) if (conds.every { k, v -> r.get(k) == v }) out.add(r)
        if (max != null && out.size() > max) out = out.take(max) as Rows
        return out
    }
    EntityValue one() { EntityList l = list(); return l ? l[0] : null }
}

String adminUrl = System.getenv("WSGATE_ADMIN_URL")
WsgateClient client = WsgateClient.fromConfig()
List<Row> updated = []
Timestamp sent = new Timestamp(1764374400000L)
Map<String, List<Row>> tables = [
    "growerp.general.ChatRoomMember": [
        new Row([chatRoomId: "room1", userId: "alice", hasRead: "Y"], updated),
        new Row([chatRoomId: "room1", userId: "bob", hasRead: "N"], updated),
        new Row([chatRoomId: "room1", userId: "carol", hasRead: "N"], updated),
        new Row([chatRoomId: "room2", userId: "dave", hasRead: "N"], updated),
    ],
    "mantle.party.Party": [new Row([partyId: "P1", ownerPartyId: "ACME"], updated)],
    "growerp.general.ChatRoomAndMessages": [
        new Row([chatRoomId: "room1", chatMessageId: "CM100", fromUserId: "alice", fromUserFullName: "alice@example.com",
                 content: "Order shipped", lastUpdatedStamp: sent], updated),
    ],
]
Map<String, Synchronization> syncs = [:]
boolean inTx = true

Row account = new Row([userId: "alice", username: "alice@example.com", partyId: "P1"], updated)
def user = [getNowTimestamp: { new Timestamp(System.currentTimeMillis()) }, getUserId: { account.userId },
            getUserAccount: { account }] as UserFacade
def l10n = [format: { Object v, String f ->
    SimpleDateFormat df = new SimpleDateFormat(f); df.setTimeZone(TimeZone.getTimeZone("UTC")); df.format(v) }] as L10nFacade
def entity = [find: { String name -> new Find(tables[name] ?: []) }] as EntityFacade
def tx = [isTransactionInPlace: { inTx }, getActiveSynchronization: { String n -> syncs[n] },
          putAndEnlistActiveSynchronization: { String n, Synchronization s -> syncs[n] = s },
          runRequireNew: { Integer t, String m, Closure c -> c.call() }] as TransactionFacade
def ecf = [getTool: { String n, Class c, Object[] p -> client },
           registerNotificationMessageListener: { NotificationMessageListener l -> }] as ExecutionContextFactory
def ec = [getFactory: { ecf }, getUser: { user },
          getL10n: { l10n }, getEntity: { entity }, getTransaction: { tx }] as ExecutionContext

// 1. A Moqui notification, wrapped the way NotificationMessageImpl does (JsonOutput of a map whose
//    sentDate is a java.sql.Timestamp), through the listener.
String wrapped = JsonOutput.toJson([topic: "SalesOrder", subTopic: null, sentDate: sent, notificationMessageId: "100234",
        topicDescription: "Sales orders", message: [orderId: "100120"], title: "Order 100120 approved",
        link: "/vapps/marble/Order/OrderDetail?orderId=100120", type: "success", persistOnSend: false,
        showAlert: true, alertNoAutoHide: false])
def nm = [getNotifyUserIds: { ["alice"] as Set }, getTopic: { "SalesOrder" }, getNotificationMessageId: { "100234" },
          getWrappedMessageJson: { wrapped }] as NotificationMessage
// Twice: once directly for the status, once through the listener (the test expects both frames).
println "notify " + client.publishNotification(nm.getNotifyUserIds(), nm.getWrappedMessageJson()).get()
new WsgateNotificationListener(client).onMessage(nm)

// 2. The chat SECA after create#growerp.general.ChatMessage committed (alice wrote in room1).
println "chat " + WsgateHooks.pushChatMessage(ec, "CM100", "room1", "alice", "Order shipped").get()

// 3. Presence, and the SECA before the unanswered-chat sweep.
List<String> ask = (System.getenv("WSGATE_CHECK_PRESENCE") ?: "").split(",").findAll { it } as List<String>
println "presence " + JsonOutput.toJson(client.presence(ask))
WsgateHooks.refreshChatPresence(ec)
println "marked " + updated.findAll { it.lastSeenDate != null }.collect { it.userId }.sort().join(",")

// 4. The revocation EECA inside a transaction (two of alice's keys deleted, bob disabled): one
//    synchronization, nothing posted before the commit, each user once after it.
WsgateHooks.revokeUser(ec, "alice")
WsgateHooks.revokeUser(ec, "alice")
WsgateHooks.revokeUser(ec, "bob")
println "revoke-deferred " + syncs.keySet().join(",") + " " + syncs.values()*.userIds.flatten().join(",")
syncs.values().each { it.afterCompletion(Status.STATUS_COMMITTED) }
println "revoke " + client.revokeUser("alice").get()

// 5. whoami, with and without a GrowERP owner party.
println "whoami " + JsonOutput.toJson(WsgateHooks.whoAmI(ec))
account.remove("partyId")
println "whoami-no-party " + JsonOutput.toJson(WsgateHooks.whoAmI(ec))

client.close()
