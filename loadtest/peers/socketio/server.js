'use strict';
// A Socket.IO 4 equivalent of wsgate's notification (/notws) and chat (/chat) service, written
// the way Socket.IO documents it, for side-by-side benchmarks:
// - the API key arrives in handshake.auth (or the query / headers) and is validated in a
//   namespace middleware against the GrowERP Authenticate endpoint, with an in-memory cache
//   (positive and negative TTL, concurrent look-ups of one key share one request);
// - notifications live in the main namespace, chat in the `/chat` namespace;
// - one room per user; the per-socket topic filter is expressed with rooms too (a socket that
//   subscribes topic T joins `n:<user>:<T>`, `ALL` joins `n:<user>:*`), so a publish is one
//   `io.to([...rooms]).emit()` and Socket.IO delivers each socket at most once;
// - with --redis-url, @socket.io/redis-adapter carries broadcasts between nodes.

const http = require('node:http');
const crypto = require('node:crypto');
const { Server } = require('socket.io');

function arg(name, env, def) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (process.env[env] !== undefined) return process.env[env];
  return def;
}

const cfg = {
  listen: arg('listen', 'PEER_LISTEN', '127.0.0.1:3000'),
  adminListen: arg('admin-listen', 'PEER_ADMIN_LISTEN', '127.0.0.1:3001'),
  backendUrl: arg('backend-url', 'PEER_BACKEND_URL', 'http://127.0.0.1:8083').replace(/\/$/, ''),
  authPath: arg('auth-path', 'PEER_AUTH_PATH', '/rest/s1/growerp/100/Authenticate'),
  classificationId: arg('auth-classification-id', 'PEER_AUTH_CLASSIFICATION_ID', 'AppAdmin'),
  chatRoomPath: arg('chat-room-path', 'PEER_CHAT_ROOM_PATH', '/rest/s1/growerp/100/ChatRoom'),
  apiToken: arg('api-token', 'PEER_API_TOKEN', ''),
  redisUrl: arg('redis-url', 'PEER_REDIS_URL', ''),
  authTtlMs: Number(arg('auth-ttl-seconds', 'PEER_AUTH_TTL_SECONDS', '60')) * 1000,
  authNegativeTtlMs: Number(arg('auth-negative-ttl-seconds', 'PEER_AUTH_NEGATIVE_TTL_SECONDS', '5')) * 1000,
  chatRoomTtlMs: Number(arg('chat-room-ttl-seconds', 'PEER_CHAT_ROOM_TTL_SECONDS', '10')) * 1000,
  backendTimeoutMs: Number(arg('backend-timeout-ms', 'PEER_BACKEND_TIMEOUT_MS', '2000')),
};

function hostPort(s) {
  const i = s.lastIndexOf(':');
  return { host: s.slice(0, i) || '0.0.0.0', port: Number(s.slice(i + 1)) };
}

const stats = {
  authenticate: 0,
  authHits: 0,
  chatRoom: 0,
  chatDropped: 0,
  published: 0,
};

// A TTL cache whose entries hold promises, so concurrent misses share one back-end call.
class PromiseCache {
  constructor() {
    this.map = new Map();
  }
  get(key, ttlFor, load) {
    const now = Date.now();
    const e = this.map.get(key);
    if (e && (e.expires === undefined || e.expires > now)) {
      stats.authHits++;
      return e.promise;
    }
    const entry = { expires: undefined, promise: null };
    entry.promise = load().then(
      (value) => {
        entry.expires = Date.now() + ttlFor(value);
        return value;
      },
      (err) => {
        if (this.map.get(key) === entry) this.map.delete(key);
        throw err;
      },
    );
    this.map.set(key, entry);
    if (this.map.size > 100000) {
      for (const [k, v] of this.map) {
        if (v.expires !== undefined && v.expires <= now) this.map.delete(k);
      }
    }
    return entry.promise;
  }
}

async function backendGet(path, key) {
  const ctl = AbortSignal.timeout(cfg.backendTimeoutMs);
  const res = await fetch(cfg.backendUrl + path, { headers: { api_key: key }, signal: ctl });
  if (res.status === 401 || res.status === 403 || res.status === 404) return { status: res.status };
  if (!res.ok) throw new Error(`back-end HTTP ${res.status}`);
  return { status: res.status, body: await res.json() };
}

const authCache = new PromiseCache();
function authenticate(key) {
  const h = crypto.createHash('sha256').update(key).digest('hex');
  return authCache.get(
    h,
    (v) => (v ? cfg.authTtlMs : cfg.authNegativeTtlMs),
    async () => {
      stats.authenticate++;
      const path = `${cfg.authPath}?classificationId=${encodeURIComponent(cfg.classificationId)}`;
      const r = await backendGet(path, key);
      const a = r.body && r.body.authenticate;
      const userId = a && a.user && a.user.userId;
      if (!userId) return null;
      return { userId: String(userId), tenantId: a.ownerPartyId ? String(a.ownerPartyId) : null };
    },
  );
}

const roomCache = new PromiseCache();
function roomMembers(roomId, key) {
  return roomCache.get(
    roomId,
    () => cfg.chatRoomTtlMs,
    async () => {
      stats.chatRoom++;
      const r = await backendGet(`${cfg.chatRoomPath}?chatRoomId=${encodeURIComponent(roomId)}`, key);
      const b = r.body || {};
      const room = Array.isArray(b.chatRooms) ? b.chatRooms[0] : b;
      const members = room && Array.isArray(room.members) ? room.members : null;
      if (!members) return null;
      return members
        .map((m) => (m && m.user && m.user.userId) || (m && m.userId))
        .filter(Boolean)
        .map(String);
    },
  );
}

function keyOf(handshake) {
  const a = handshake.auth || {};
  const q = handshake.query || {};
  const hd = handshake.headers || {};
  const bearer = /^Bearer\s+(.+)$/i.exec(hd.authorization || '');
  return a.api_key || a.apiKey || q.api_key || q.apiKey || hd.api_key || (bearer && bearer[1]) || null;
}

async function authMiddleware(socket, next) {
  const key = keyOf(socket.handshake);
  if (!key) return next(new Error('missing key'));
  let user;
  try {
    user = await authenticate(key);
  } catch (e) {
    return next(new Error('back-end unavailable'));
  }
  if (!user) return next(new Error('invalid key'));
  const claimed = (socket.handshake.auth && socket.handshake.auth.userId) || socket.handshake.query.userId;
  if (claimed && String(claimed) !== user.userId) return next(new Error('user mismatch'));
  socket.data.userId = user.userId;
  socket.data.tenantId = user.tenantId;
  socket.data.key = key;
  next();
}

function topicsOf(arg) {
  const list = Array.isArray(arg) ? arg : String(arg == null ? '' : arg).split(',');
  return list.map((t) => String(t).trim()).filter((t) => t.length > 0);
}

// Rooms a socket joins for topic T (T = '*' for ALL).
function topicRooms(socket, t) {
  const rooms = [`n:${socket.data.userId}:${t}`, `na:${t}`];
  if (socket.data.tenantId) rooms.push(`nt:${socket.data.tenantId}:${t}`);
  return rooms;
}

const httpServer = http.createServer((req, res) => {
  res.writeHead(404).end();
});
const io = new Server(httpServer, {
  serveClient: false,
  maxHttpBufferSize: 65536,
  perMessageDeflate: false,
  pingInterval: 30000,
  pingTimeout: 20000,
});

io.use(authMiddleware);
io.on('connection', (socket) => {
  socket.join(`u:${socket.data.userId}`);
  socket.on('subscribe', (arg) => {
    for (const t of topicsOf(arg)) socket.join(topicRooms(socket, t === 'ALL' ? '*' : t));
  });
  socket.on('unsubscribe', (arg) => {
    for (const t of topicsOf(arg)) for (const r of topicRooms(socket, t === 'ALL' ? '*' : t)) socket.leave(r);
  });
});

const chat = io.of('/chat');
chat.use(authMiddleware);
chat.on('connection', (socket) => {
  const uid = socket.data.userId;
  socket.join(`u:${uid}`);
  socket.on('chat', async (raw) => {
    const msg = raw && typeof raw === 'object' ? (raw.chatMessage && typeof raw.chatMessage === 'object' ? raw.chatMessage : raw) : null;
    const roomId = msg && msg.chatRoom && msg.chatRoom.chatRoomId;
    if (!roomId) {
      stats.chatDropped++;
      return;
    }
    let members;
    try {
      members = await roomMembers(String(roomId), socket.data.key);
    } catch (e) {
      stats.chatDropped++;
      return;
    }
    if (!members || !members.includes(uid)) {
      stats.chatDropped++;
      return;
    }
    const rooms = members.filter((m) => m !== uid).map((m) => `u:${m}`);
    if (rooms.length) chat.to(rooms).emit('chat', { ...msg, fromUserId: uid });
  });
});

// The publish API, with the same JSON shape as wsgate's /api/v1 on the admin listener.
function send(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

function readBody(req, limit) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let n = 0;
    req.on('data', (c) => {
      n += c.length;
      if (n > limit) {
        reject(Object.assign(new Error('too large'), { status: 413 }));
        req.destroy();
      } else chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function metricsText() {
  const cpu = process.cpuUsage();
  const mem = process.memoryUsage();
  return [
    `# TYPE process_cpu_seconds_total counter`,
    `process_cpu_seconds_total ${(cpu.user + cpu.system) / 1e6}`,
    `# TYPE process_resident_memory_bytes gauge`,
    `process_resident_memory_bytes ${mem.rss}`,
    `# TYPE peer_connections gauge`,
    `peer_connections{endpoint="notifications"} ${io.of('/').sockets.size}`,
    `peer_connections{endpoint="chat"} ${chat.sockets.size}`,
    `# TYPE peer_backend_calls_total counter`,
    `peer_backend_calls_total{call="authenticate"} ${stats.authenticate}`,
    `peer_backend_calls_total{call="chat_room"} ${stats.chatRoom}`,
    `# TYPE peer_published_total counter`,
    `peer_published_total ${stats.published}`,
    '',
  ].join('\n');
}

const admin = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://admin');
  try {
    if (req.method === 'GET' && url.pathname === '/healthz') return send(res, 200, { status: 'ok' });
    if (req.method === 'GET' && url.pathname === '/readyz') return send(res, 200, { status: 'ready' });
    if (req.method === 'GET' && url.pathname === '/metrics') {
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
      return res.end(metricsText());
    }
    if (!url.pathname.startsWith('/api/v1/')) return send(res, 404, { error: 'not found' });
    if (!cfg.apiToken) return send(res, 403, { error: 'no --api-token configured: the publish API is disabled' });
    if ((req.headers.authorization || '') !== `Bearer ${cfg.apiToken}`) return send(res, 401, { error: 'wrong token' });
    if (req.method === 'GET' && url.pathname === '/api/v1/presence') {
      const online = {};
      for (const u of url.searchParams.getAll('userId')) {
        online[u] = (await io.in(`u:${u}`).fetchSockets()).length > 0;
      }
      return send(res, 200, { online });
    }
    if (req.method !== 'POST') return send(res, 405, { error: 'method not allowed' });
    let body;
    try {
      body = JSON.parse(await readBody(req, 1 << 20));
    } catch (e) {
      return send(res, e.status || 400, { error: e.status ? 'too large' : 'invalid JSON' });
    }
    if (url.pathname === '/api/v1/notifications') {
      const n = body && body.notification;
      if (!n || typeof n !== 'object' || typeof n.topic !== 'string' || !n.topic) {
        return send(res, 400, { error: 'notification.topic is required' });
      }
      let rooms;
      let target;
      if (Array.isArray(body.userIds)) {
        target = 'users';
        rooms = [];
        for (const u of body.userIds) rooms.push(`n:${u}:*`, `n:${u}:${n.topic}`);
      } else if (typeof body.tenantId === 'string') {
        target = 'tenant';
        rooms = [`nt:${body.tenantId}:*`, `nt:${body.tenantId}:${n.topic}`];
      } else if (body.broadcast === true) {
        target = 'broadcast';
        rooms = ['na:*', `na:${n.topic}`];
      } else {
        return send(res, 400, { error: 'one of userIds, tenantId, broadcast is required' });
      }
      if (rooms.length) io.to(rooms).emit('notification', n);
      stats.published++;
      return send(res, 202, { topic: n.topic, target, rooms: rooms.length });
    }
    if (url.pathname === '/api/v1/chat') {
      if (!Array.isArray(body.userIds) || !body.chatMessage || typeof body.chatMessage !== 'object') {
        return send(res, 400, { error: 'userIds and chatMessage are required' });
      }
      const rooms = body.userIds.map((u) => `u:${u}`);
      if (rooms.length) chat.to(rooms).emit('chat', body.chatMessage);
      return send(res, 202, { target: 'users', rooms: rooms.length });
    }
    return send(res, 404, { error: 'not found' });
  } catch (e) {
    return send(res, 500, { error: String(e && e.message) });
  }
});

async function main() {
  if (cfg.redisUrl) {
    const { createClient } = require('redis');
    const { createAdapter } = require('@socket.io/redis-adapter');
    const pub = createClient({ url: cfg.redisUrl });
    const sub = pub.duplicate();
    pub.on('error', (e) => console.error('redis:', e.message));
    sub.on('error', (e) => console.error('redis:', e.message));
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
  }
  const pub = hostPort(cfg.listen);
  const adm = hostPort(cfg.adminListen);
  await new Promise((r) => httpServer.listen(pub.port, pub.host, r));
  await new Promise((r) => admin.listen(adm.port, adm.host, r));
  console.log(
    `socket.io peer pid ${process.pid}: public ${cfg.listen}, admin ${cfg.adminListen}, back-end ${cfg.backendUrl}` +
      (cfg.redisUrl ? ', redis adapter' : ', in-memory adapter'),
  );
}

function shutdown() {
  io.close();
  admin.close();
  setTimeout(() => process.exit(0), 500).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
