/*
 * wsgate client for Moqui: publishes notifications and chat messages to the wsgate
 * internal API, asks it for presence and revokes users. Thread-safe; one instance per Moqui node.
 *
 * Configuration (system property first, then environment variable):
 *   WSGATE_ADMIN_URL         base URL of the wsgate admin Service, e.g. http://wsgate-admin.erp.svc:8082
 *   WSGATE_API_TOKEN         bearer token of the publish API (never logged)
 *   WSGATE_TIMEOUT_MS        request timeout in milliseconds (default 3000)
 */
package wsgate.moqui

import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import groovy.transform.CompileStatic
import org.slf4j.Logger
import org.slf4j.LoggerFactory

import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.nio.charset.StandardCharsets
import java.time.Duration
import java.util.concurrent.CompletableFuture
import java.util.concurrent.Executors
import java.util.concurrent.ExecutorService
import java.util.concurrent.TimeUnit

@CompileStatic
class WsgateClient {
    protected final static Logger logger = LoggerFactory.getLogger(WsgateClient.class)

    final String adminUrl
    private final String apiToken
    private final Duration timeout
    private final ExecutorService executor
    private final HttpClient http

    /** Reads WSGATE_ADMIN_URL, WSGATE_API_TOKEN and WSGATE_TIMEOUT_MS. */
    static WsgateClient fromConfig() {
        String url = setting("WSGATE_ADMIN_URL")
        String token = setting("WSGATE_API_TOKEN")
        String timeoutMs = setting("WSGATE_TIMEOUT_MS")
        if (!url) throw new IllegalStateException("WSGATE_ADMIN_URL is not set (system property or environment variable)")
        if (!token) throw new IllegalStateException("WSGATE_API_TOKEN is not set (system property or environment variable)")
        return new WsgateClient(url, token, Duration.ofMillis(timeoutMs ? Long.parseLong(timeoutMs) : 3000L))
    }

    static String setting(String name) {
        String value = System.getProperty(name)
        if (value == null || value.isEmpty()) value = System.getenv(name)
        return value != null && !value.isEmpty() ? value.trim() : null
    }

    WsgateClient(String adminUrl, String apiToken, Duration timeout) {
        this.adminUrl = adminUrl.endsWith("/") ? adminUrl.substring(0, adminUrl.length() - 1) : adminUrl
        this.apiToken = apiToken
        this.timeout = timeout
        // A few daemon threads: publishing never blocks Moqui's worker pool for long.
        this.executor = Executors.newFixedThreadPool(4, { Runnable r ->
            Thread t = new Thread(r, "wsgate-client")
            t.setDaemon(true)
            return t
        })
        this.http = HttpClient.newBuilder()
                .connectTimeout(timeout)
                .executor(executor)
                .version(HttpClient.Version.HTTP_1_1)
                .build()
    }

    /**
     * POST /api/v1/notifications {"userIds": [...], "notification": <wrappedMessageJson>}.
     * wrappedMessageJson is inserted as is (Moqui's NotificationMessage.getWrappedMessageJson()),
     * so clients receive exactly the JSON Moqui's own WebSocket would have sent.
     */
    CompletableFuture<Integer> publishNotification(Collection<String> userIds, String wrappedMessageJson) {
        String body = '{"userIds":' + JsonOutput.toJson(new ArrayList<String>(userIds)) +
                ',"notification":' + wrappedMessageJson + '}'
        return postAsync("/api/v1/notifications", body)
    }

    /** POST /api/v1/notifications {"tenantId": ..., "notification": ...}: every user of a tenant. */
    CompletableFuture<Integer> publishNotificationToTenant(String tenantId, String wrappedMessageJson) {
        String body = '{"tenantId":' + JsonOutput.toJson(tenantId) + ',"notification":' + wrappedMessageJson + '}'
        return postAsync("/api/v1/notifications", body)
    }

    /** POST /api/v1/chat {"userIds": [...], "chatMessage": {...}}: GrowERP ChatEndpoint.pushToMembers. */
    CompletableFuture<Integer> pushChat(Collection<String> userIds, Map<String, Object> chatMessage) {
        String body = JsonOutput.toJson([userIds: new ArrayList<String>(userIds), chatMessage: chatMessage])
        return postAsync("/api/v1/chat", body)
    }

    /** Users per presence request, so that the query string stays well below header limits. */
    static final int PRESENCE_BATCH = 100

    /**
     * GET /api/v1/presence?userId=a&userId=b: which of the users have an open WebSocket on any
     * wsgate node ({"online": {"a": true, "b": false}}). Synchronous, bounded by the timeout;
     * throws when wsgate does not answer 200.
     */
    Map<String, Boolean> presence(Collection<String> userIds) {
        Map<String, Boolean> result = new LinkedHashMap<String, Boolean>()
        if (!userIds) return result
        List<String> all = new ArrayList<String>(new LinkedHashSet<String>(userIds))
        for (int from = 0; from < all.size(); from += PRESENCE_BATCH) {
            List<String> batch = all.subList(from, Math.min(from + PRESENCE_BATCH, all.size()))
            String query = batch.collect { String u -> "userId=" + URLEncoder.encode(u, "UTF-8") }.join("&")
            HttpRequest request = HttpRequest.newBuilder(URI.create(adminUrl + "/api/v1/presence?" + query))
                    .timeout(timeout)
                    .header("Authorization", "Bearer " + apiToken)
                    .GET().build()
            HttpResponse<String> response = http.send(request, HttpResponse.BodyHandlers.ofString())
            if (response.statusCode() != 200)
                throw new IllegalStateException("wsgate presence answered HTTP ${response.statusCode()}: ${truncate(response.body())}")
            Map parsed = (Map) new JsonSlurper().parseText(response.body())
            ((Map) parsed.online).each { k, v -> result.put((String) k, Boolean.TRUE == v) }
        }
        return result
    }

    /** GrowERP ChatEndpoint.isUserOnline replacement. */
    boolean isUserOnline(String userId) { return presence([userId]).get(userId) ?: false }

    /**
     * POST /api/v1/revocations {"userId": ...}: every wsgate node forgets the user's cached
     * identities and closes the user's sockets (1008). Answers 202.
     */
    CompletableFuture<Integer> revokeUser(String userId) {
        return postAsync("/api/v1/revocations", JsonOutput.toJson([userId: userId]))
    }

    CompletableFuture<Integer> postAsync(String path, String body) {
        HttpRequest request = HttpRequest.newBuilder(URI.create(adminUrl + path))
                .timeout(timeout)
                .header("Authorization", "Bearer " + apiToken)
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(body, StandardCharsets.UTF_8))
                .build()
        return http.sendAsync(request, HttpResponse.BodyHandlers.ofString()).handle { HttpResponse<String> response, Throwable error ->
            if (error != null) {
                Throwable cause = error
                while (cause instanceof java.util.concurrent.CompletionException && cause.cause != null) cause = cause.cause
                // The message names the path and the error, never the token.
                logger.warn("wsgate ${adminUrl}${path} failed: ${cause.class.simpleName}${cause.message ? ': ' + cause.message : ''}")
                return -1
            }
            int status = response.statusCode()
            if (status != 202) logger.warn("wsgate ${path} answered HTTP ${status}: ${truncate(response.body())}")
            return status
        }
    }

    private static String truncate(String s) { s == null ? "" : (s.length() > 300 ? s.substring(0, 300) + "..." : s) }

    void close() {
        executor.shutdown()
        executor.awaitTermination(timeout.toMillis(), TimeUnit.MILLISECONDS)
    }

    @Override String toString() { "WsgateClient(${adminUrl})" }
}
