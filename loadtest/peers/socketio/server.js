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
//
// Cluster mode (`--workers N`, N >= 1, the default 2): the primary forks N workers with
// node:cluster; every worker listens on the same public and admin ports (the primary accepts and
// hands connections round-robin, node's default on Linux) and uses @socket.io/redis-adapter on
// the same Redis, so a publish that lands on one worker reaches sockets on the others. Only the
// WebSocket transport is enabled: a connection is one TCP connection handled by the worker that
// accepted it, so no sticky sessions are needed (HTTP long-polling would need them). The
// admin API's /metrics sums over all workers (asked through the primary) plus the primary.
// `--workers 0` runs one process without node:cluster, as before.

const cluster = require('node:cluster');
const fs = require('node:fs');
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
  workers: Number(arg('workers', 'PEER_WORKERS', '2')),
  readyFile: arg('ready-file', 'PEER_READY_FILE', ''),
};
const clustered = cfg.workers >= 1;

if (clustered && cluster.isPrimary) {
  runPrimary();
} else {
  runServer();
}

// ---------------------------------------------------------------- primary (cluster mode)

function processStats() {
  const cpu = process.cpuUsage();
  return {
    cpuSeconds: (cpu.user + cpu.system) / 1e6,
    rssBytes: process.memoryUsage().rss,
  };
}

function runPrimary() {
  if (cfg.workers > 1 && !cfg.redisUrl) {
    console.error('--workers > 1 needs --redis-url: the workers share broadcasts through Redis');
    process.exit(64);
  }
  const ready = new Set();
  const pending = new Map(); // request id -> { from, left, sum }
  let stopping = false;
  const sumInto = (sum, s) => {
    for (const [k, v] of Object.entries(s)) sum[k] = (sum[k] || 0) + v;
  };
  for (let i = 0; i < cfg.workers; i++) cluster.fork();
  cluster.on('exit', (w, code, signal) => {
    if (stopping) return;
    console.error(`worker ${w.process.pid} exited (${signal || code}); stopping`);
    stopping = true;
    for (const o of Object.values(cluster.workers)) o.kill();
    process.exitCode = 1;
  });
  cluster.on('message', (w, m) => {
    if (!m || typeof m !== 'object') return;
    if (m.type === 'ready') {
      ready.add(w.process.pid);
      if (ready.size === cfg.workers) {
        const pids = [process.pid, ...ready];
        console.log(`socket.io peer primary ${process.pid}, workers ${[...ready].join(',')}`);
        if (cfg.readyFile) fs.writeFileSync(cfg.readyFile, pids.join(',') + '\n');
      }
    } else if (m.type === 'stats?') {
      // A worker answers /metrics: ask every worker, sum, add the primary's own process figures.
      const all = Object.values(cluster.workers);
      const sum = {};
      sumInto(sum, processStats());
      pending.set(m.id, { from: w, left: all.length, sum });
      for (const o of all) o.send({ type: 'stats-req', id: m.id });
    } else if (m.type === 'stats') {
      const p = pending.get(m.id);
      if (!p) return;
      sumInto(p.sum, m.stats);
      if (--p.left === 0) {
        pending.delete(m.id);
        if (p.from.isConnected()) p.from.send({ type: 'stats-sum', id: m.id, sum: p.sum });
      }
    }
  });
  const stop = () => {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.kill('SIGTERM');
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

// ---------------------------------------------------------------- server (worker or single process)

function runServer() {

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
  // WebSocket only: no HTTP long-polling, so no sticky sessions in cluster mode.
  transports: ['websocket'],
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

// This process's figures (a worker's share in cluster mode).
function localStats() {
  return {
    ...processStats(),
    notifications: io.of('/').sockets.size,
    chat: chat.sockets.size,
    authenticate: stats.authenticate,
    chatRoom: stats.chatRoom,
    published: stats.published,
  };
}

// The figures of the whole server: in cluster mode summed over the workers and the primary.
let statsSeq = 0;
const statsWaiting = new Map();
function serverStats() {
  if (!cluster.isWorker) return Promise.resolve(localStats());
  const id = `${process.pid}-${++statsSeq}`;
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      statsWaiting.delete(id);
      resolve(localStats());
    }, 2000);
    statsWaiting.set(id, (sum) => {
      clearTimeout(t);
      resolve(sum);
    });
    process.send({ type: 'stats?', id });
  });
}
if (cluster.isWorker) {
  process.on('message', (m) => {
    if (!m || typeof m !== 'object') return;
    if (m.type === 'stats-req') process.send({ type: 'stats', id: m.id, stats: localStats() });
    else if (m.type === 'stats-sum') {
      const done = statsWaiting.get(m.id);
      statsWaiting.delete(m.id);
      if (done) done(m.sum);
    }
  });
}

async function metricsText() {
  const s = await serverStats();
  return [
    `# TYPE process_cpu_seconds_total counter`,
    `process_cpu_seconds_total ${s.cpuSeconds}`,
    `# TYPE process_resident_memory_bytes gauge`,
    `process_resident_memory_bytes ${s.rssBytes}`,
    `# TYPE peer_connections gauge`,
    `peer_connections{endpoint="notifications"} ${s.notifications}`,
    `peer_connections{endpoint="chat"} ${s.chat}`,
    `# TYPE peer_backend_calls_total counter`,
    `peer_backend_calls_total{call="authenticate"} ${s.authenticate}`,
    `peer_backend_calls_total{call="chat_room"} ${s.chatRoom}`,
    `# TYPE peer_published_total counter`,
    `peer_published_total ${s.published}`,
    '',
  ].join('\n');
}

const admin = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://admin');
  try {
    if (req.method === 'GET' && url.pathname === '/healthz') return send(res, 200, { status: 'ok' });
    if (req.method === 'GET' && url.pathname === '/readyz') return send(res, 200, { status: 'ready' });
    if (req.method === 'GET' && url.pathname === '/metrics') {
      const text = await metricsText();
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
      return res.end(text);
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
  let masking = 'JavaScript';
  try {
    if (require('bufferutil').mask.toString().includes('[native code]')) masking = 'bufferutil (native)';
  } catch (e) {
    // not installed: ws masks in JavaScript
  }
  console.log(
    `socket.io peer ${cluster.isWorker ? 'worker' : 'pid'} ${process.pid}: public ${cfg.listen}, admin ${cfg.adminListen}, back-end ${cfg.backendUrl}` +
      (cfg.redisUrl ? ', redis adapter' : ', in-memory adapter') +
      `, frame masking: ${masking}`,
  );
  if (cluster.isWorker) process.send({ type: 'ready' });
  else if (cfg.readyFile) fs.writeFileSync(cfg.readyFile, `${process.pid}\n`);
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
}
