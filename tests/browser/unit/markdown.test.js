// Unit tests of web/markdown.js (Node's test runner, no browser): the parsed blocks and inlines,
// safe hrefs, and the DOM it builds through a minimal fake document that has no HTML parser at
// all (no innerHTML, no insertAdjacentHTML): message text can only ever become text nodes.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { parseInline, parseMarkdown, renderMarkdown, safeHref } from '../../../web/markdown.js';

/** A document with createElement / createTextNode / createDocumentFragment only. */
class FakeNode {
  constructor(tag) {
    this.tag = tag;
    this.children = [];
    this.attributes = {};
  }
  append(...nodes) {
    for (const n of nodes) {
      assert.ok(n instanceof FakeNode || n instanceof FakeText, `append of a ${typeof n}: strings would be parsed by nobody, but we only build nodes`);
      this.children.push(n);
    }
  }
  setAttribute(name, value) {
    assert.match(name, /^(href|target|rel|title|class|start|data-lang)$/, `attribute ${name}`);
    this.attributes[name] = String(value);
  }
  set innerHTML(_) {
    throw new Error('innerHTML must never be used');
  }
  insertAdjacentHTML() {
    throw new Error('insertAdjacentHTML must never be used');
  }
  get text() {
    return this.children.map((c) => c.text).join('');
  }
}
class FakeText {
  constructor(text) {
    this.text = text;
  }
}
const doc = {
  createElement: (tag) => {
    assert.match(tag, /^(p|h[1-6]|hr|blockquote|pre|code|ul|ol|li|br|strong|em|del|a)$/, `element ${tag}`);
    return new FakeNode(tag);
  },
  createTextNode: (text) => new FakeText(text),
  createDocumentFragment: () => new FakeNode('#fragment'),
};

/** A compact view of a fake tree: [tag, attrs?, ...children] and strings for text. */
function tree(node) {
  if (node instanceof FakeText) return node.text;
  const out = [node.tag];
  if (Object.keys(node.attributes).length) out.push(node.attributes);
  for (const c of node.children) out.push(tree(c));
  return out;
}
const render = (text) => tree(renderMarkdown(text, doc)).slice(1);

test('paragraphs, line breaks, bold, italic, strikethrough and inline code', () => {
  assert.deepEqual(render('Hello **bold**, *it*, _also it_, ~~gone~~ and `a < b`.\nNext line\n\nSecond paragraph'), [
    ['p', 'Hello ', ['strong', 'bold'], ', ', ['em', 'it'], ', ', ['em', 'also it'], ', ', ['del', 'gone'], ' and ',
      ['code', 'a < b'], '.', ['br'], 'Next line'],
    ['p', 'Second paragraph'],
  ]);
  assert.deepEqual(render('***both***'), [['p', ['strong', ['em', 'both']]]]);
  assert.deepEqual(render('``code with ` inside``'), [['p', ['code', 'code with ` inside']]]);
});

test('snake_case, lone stars and unmatched delimiters stay literal', () => {
  assert.deepEqual(render('call my_long_function_name now'), [['p', 'call my_long_function_name now']]);
  assert.deepEqual(render('2 * 3 * 4 and **unclosed and `open'), [['p', '2 * 3 * 4 and **unclosed and `open']]);
  assert.deepEqual(render('\\*not em\\*'), [['p', '*not em*']]);
});

test('lists: bullets, numbers, nesting, a start number', () => {
  assert.deepEqual(render('- one\n- two **b**\n  - nested\n- three'), [
    ['ul', ['li', 'one'], ['li', ['p', 'two ', ['strong', 'b']], ['ul', ['li', 'nested']]], ['li', 'three']],
  ]);
  assert.deepEqual(render('3. c\n4. d'), [['ol', { start: '3' }, ['li', 'c'], ['li', 'd']]]);
  assert.deepEqual(render('Steps:\n1. a\n2. b'), [['p', 'Steps:'], ['ol', ['li', 'a'], ['li', 'b']]]);
});

test('fenced and indented code blocks keep their text verbatim', () => {
  assert.deepEqual(render('```js\nconst a = "<b>";\n  indented **not bold**\n```\nafter'), [
    ['pre', { class: 'md-code' }, ['code', { 'data-lang': 'js' }, 'const a = "<b>";\n  indented **not bold**']],
    ['p', 'after'],
  ]);
  // A fence still open (a reply streaming) is a code block to the end.
  assert.deepEqual(render('~~~\nopen'), [['pre', { class: 'md-code' }, ['code', 'open']]]);
  assert.deepEqual(render('    four spaces\n    more'), [['pre', { class: 'md-code' }, ['code', 'four spaces\nmore']]]);
});

test('headings, quotes and rules', () => {
  assert.deepEqual(render('# Title\n## Sub\n> quoted *x*\n\n---'), [
    ['h3', 'Title'],
    ['h4', 'Sub'],
    ['blockquote', ['p', 'quoted ', ['em', 'x']]],
    ['hr'],
  ]);
});

test('links: http, https and mailto only, opened with noopener', () => {
  const rel = { target: '_blank', rel: 'noopener noreferrer' };
  assert.deepEqual(render('[docs](https://example.com/a?b=1) and <mailto:me@example.com> and http://x.test/p.'), [
    ['p', ['a', { href: 'https://example.com/a?b=1', ...rel }, 'docs'], ' and ',
      ['a', { href: 'mailto:me@example.com', ...rel }, 'mailto:me@example.com'], ' and ',
      ['a', { href: 'http://x.test/p', ...rel }, 'http://x.test/p'], '.'],
  ]);
  assert.deepEqual(render('[t](https://e.test "Title")'), [['p', ['a', { href: 'https://e.test/', ...rel, title: 'Title' }, 't']]]);
});

test('an HTML injection attempt is only ever text', () => {
  const attack = '<img src=x onerror=alert(1)> <script>alert(2)</script> [click](javascript:alert(3)) '
    + '[x](JAVASCRIPT:alert(4)) [y](data:text/html,<b>) [z](  javascript:alert(5)) [r](/relative) '
    + '<javascript:alert(6)> [w](java\tscript:alert(7))';
  const out = render(attack);
  assert.equal(out.length, 1);
  const [p] = out;
  assert.equal(p[0], 'p');
  // No element but the paragraph: every character is in text nodes.
  assert.ok(p.slice(1).every((c) => typeof c === 'string'), JSON.stringify(p));
  assert.equal(p.slice(1).join(''), attack);
  // Inside code, too.
  assert.deepEqual(render('`<script>`'), [['p', ['code', '<script>']]]);
});

test('safeHref accepts only absolute http(s) and mailto URLs', () => {
  assert.equal(safeHref('https://a.test/x y'), null);
  assert.equal(safeHref('javascript:alert(1)'), null);
  assert.equal(safeHref(' https://a.test '), 'https://a.test/');
  assert.equal(safeHref('HTTPS://A.TEST'), 'https://a.test/');
  assert.equal(safeHref('vbscript:x'), null);
  assert.equal(safeHref('//evil.test'), null);
  assert.equal(safeHref('https://a.test/"onmouseover=1'), null);
});

test('hostile input stays fast (no quadratic scans)', () => {
  for (const piece of ['**a ', '`', '[', '_x ', '~~', '*', '[a](', '<http://']) {
    const text = piece.repeat(20000);
    const start = performance.now();
    parseMarkdown(text);
    const ms = performance.now() - start;
    assert.ok(ms < 1500, `${JSON.stringify(piece)} x 20000 took ${ms.toFixed(0)} ms`);
  }
});

test('parseInline is exported for plain strings', () => {
  assert.deepEqual(parseInline('a `b`'), [{ type: 'text', text: 'a ' }, { type: 'code', text: 'b' }]);
});
