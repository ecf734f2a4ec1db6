// Preloaded into every test process (NODE_OPTIONS=--require) by amqplib.sh.
// 1. amqplib's callback_api and connect tests connect to amqp://localhost (port 5672) with no way
//    to configure it; only channel_api reads process.env.URL. This redirects sockets aimed at port
//    5672 / 5671 of localhost, 127.0.0.1 or ::1 (or no host) to AMQPLIB_TEST_PORT / AMQPLIB_TEST_TLS_PORT.
//    The host is kept, so e.g. the [::1] test still really tries IPv6.
// 2. Tests listed in AMQPLIB_EXCLUDE_FILE ("<file>: <suite> > ... > <test>  # reason") are
//    registered as skipped (reason "excluded") instead of being run. AMQPLIB_TEST_FILE names the
//    file being run (the script runs one file per node --test invocation).
'use strict';
const net = require('node:net');
const tls = require('node:tls');
const path = require('node:path');
const fs = require('node:fs');

const PORT = parseInt(process.env.AMQPLIB_TEST_PORT || '', 10);
const TLS_PORT = parseInt(process.env.AMQPLIB_TEST_TLS_PORT || '', 10);
const LOCAL = new Set([undefined, null, '', 'localhost', '127.0.0.1', '::1']);

function redirect(orig, from, to) {
  return function (...args) {
    if (to && args[0] && typeof args[0] === 'object' && !Array.isArray(args[0])) {
      const o = args[0];
      if (Number(o.port) === from && LOCAL.has(o.host)) args[0] = Object.assign({}, o, { port: to });
    }
    return orig.apply(this, args);
  };
}
net.connect = net.createConnection = redirect(net.connect, 5672, PORT);
tls.connect = redirect(tls.connect, 5671, TLS_PORT);

const excluded = new Set();
if (process.env.AMQPLIB_EXCLUDE_FILE && fs.existsSync(process.env.AMQPLIB_EXCLUDE_FILE)) {
  for (const line of fs.readFileSync(process.env.AMQPLIB_EXCLUDE_FILE, 'utf8').split('\n')) {
    const id = line.replace(/\s+#.*$/, '').trim();
    if (id && !id.startsWith('#')) excluded.add(id);
  }
}
// 3. Per-test and per-hook timeouts (AMQPLIB_TEST_TIMEOUT_MS). Node 20's --test-timeout also
//    applies to the whole file, so one slow file would be killed with all its remaining tests;
//    here each it() and each hook gets its own timeout instead (unless it sets one itself).
const TIMEOUT = parseInt(process.env.AMQPLIB_TEST_TIMEOUT_MS || '', 10) || undefined;
if (process.env.AMQPLIB_TEST_FILE) {
  const t = require('node:test');
  const file = process.env.AMQPLIB_TEST_FILE;
  const stack = [];
  const split = (args) => {
    const name = typeof args[0] === 'string' ? args[0] : undefined;
    const fn = args.find((a) => typeof a === 'function');
    const opts = args.find((a, i) => i > 0 && a && typeof a === 'object') || {};
    return { name, fn, opts };
  };
  const withTimeout = (opts) => (TIMEOUT && opts.timeout === undefined ? Object.assign({}, opts, { timeout: TIMEOUT }) : opts);
  const origDescribe = t.describe;
  const origIt = t.it;
  const wrapDescribe = function (...args) {
    const { name, fn, opts } = split(args);
    return origDescribe.call(this, name, opts, function (...a) {
      stack.push(name);
      try { return fn && fn.apply(this, a); } finally { stack.pop(); }
    });
  };
  const wrapIt = function (...args) {
    const { name, fn, opts } = split(args);
    const id = `${file}: ${[...stack, name].join(' > ')}`;
    if (excluded.has(id)) return origIt.call(this, name, Object.assign({}, opts, { skip: 'excluded' }), () => {});
    return origIt.call(this, name, withTimeout(opts), fn);
  };
  const wrapHook = (orig) => function (fn, opts) { return orig.call(this, fn, withTimeout(opts || {})); };
  t.describe = t.suite = wrapDescribe;
  t.it = wrapIt;
  if (t.test === origIt) t.test = wrapIt;
  for (const h of ['before', 'after', 'beforeEach', 'afterEach']) if (t[h]) t[h] = wrapHook(t[h]);
}
