// node:test reporter for amqplib.sh: one line per test, id = "<file>: <suite> > ... > <test>".
// Suites are not counted; a failing suite (e.g. a failing hook or a file that crashed) whose
// failure is not already charged to one of its tests is reported as a failure of the suite id.
import path from 'node:path';
export default async function* reporter(source) {
  const stacks = new Map();
  const failedUnder = new Set();
  let passed = 0, failed = 0, skipped = 0;
  // preload.js wraps describe/it, so node reports preload.js as the file of every test; the
  // script runs one test file per invocation and names it in AMQPLIB_TEST_FILE.
  const fileOf = (d) => process.env.AMQPLIB_TEST_FILE || (d.file ? path.basename(d.file) : '?');
  const idOf = (d) => {
    const f = fileOf(d);
    const st = stacks.get(f) || [];
    st.length = d.nesting;
    st[d.nesting] = d.name;
    stacks.set(f, st);
    return `${f}: ${st.join(' > ')}`;
  };
  const curId = (d) => {
    const f = fileOf(d);
    const st = (stacks.get(f) || []).slice(0, d.nesting);
    st[d.nesting] = d.name;
    return `${f}: ${st.join(' > ')}`;
  };
  const errText = (e) => {
    if (!e) return '';
    let x = e;
    while (x && x.cause && (x.code === 'ERR_TEST_FAILURE' || x.failureType)) x = x.cause;
    const s = (x && (x.stack || x.message)) || String(x);
    return String(s).split('\n').slice(0, 12).map((l) => '      | ' + l).join('\n');
  };
  for await (const ev of source) {
    const d = ev.data || {};
    if (ev.type === 'test:start') { idOf(d); continue; }
    if (ev.type !== 'test:pass' && ev.type !== 'test:fail') {
      if (ev.type === 'test:stderr' || ev.type === 'test:stdout') { /* dropped */ }
      continue;
    }
    const id = curId(d);
    const isSuite = d.details && d.details.type === 'suite';
    const ms = d.details && d.details.duration_ms != null ? ` (${Math.round(d.details.duration_ms)}ms)` : '';
    if (isSuite) {
      if (ev.type === 'test:fail' && ![...failedUnder].some((x) => x.startsWith(id + ' > '))) {
        failed++; failedUnder.add(id);
        yield `FAIL ${id} [suite/hook]${ms}\n${errText(d.details && d.details.error)}\n`;
      }
      continue;
    }
    if (d.skip !== undefined || d.todo !== undefined) {
      skipped++;
      yield `SKIP ${id} (${d.skip || d.todo})\n`;
    } else if (ev.type === 'test:pass') {
      passed++;
      yield `ok   ${id}${ms}\n`;
    } else {
      failed++; failedUnder.add(id);
      yield `FAIL ${id}${ms}\n${errText(d.details && d.details.error)}\n`;
    }
  }
  yield `RESULT ${passed} passed, ${failed} failed, ${skipped} skipped\n`;
}
