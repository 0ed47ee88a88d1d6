// A small, safe Markdown renderer for the console's assistant messages.
//
// Why our own and not a library: the console has no dependencies and no build step, and a
// message must never become HTML. This renderer parses a tight subset (paragraphs, headings,
// lists, block quotes, rules, fenced and indented code, inline code, bold, italic,
// strikethrough, links and bare URLs) into plain objects, then builds DOM nodes with
// createElement / createTextNode only: message text is only ever a text node, so `<script>`,
// `<img onerror>` and the like are shown as the characters they are. Links keep an href only
// when it is http:, https: or mailto: (anything else, `javascript:` included, stays text) and
// open in a new tab with rel="noopener noreferrer".
//
// parseMarkdown(text) → blocks; renderMarkdown(text, document?) → DocumentFragment.

const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])([ \t]+(.*))?$/;
const BLANK = /^[ \t]*$/;

/** Longest label and URL a link may have (bounds the scans on hostile input). */
const MAX_LABEL = 1000;
const MAX_URL = 2048;

const indentOf = (line) => line.length - line.trimStart().length;
const expandTabs = (line) => line.replace(/^\t+/, (tabs) => '    '.repeat(tabs.length));

function itemInfo(line) {
  const m = ITEM.exec(line);
  if (!m) return null;
  const ordered = /\d/.test(m[2]);
  const spaces = m[3] ? m[3].length - (m[4] ?? '').length : 1;
  return {
    indent: m[1].length,
    ordered,
    start: ordered ? Number.parseInt(m[2], 10) : 1,
    marker: ordered ? m[2].slice(-1) : m[2],
    content: m[4] ?? '',
    // Where the item's own lines start (a bare "-" starts an empty item).
    column: m[1].length + m[2].length + Math.min(Math.max(spaces, 1), 4),
  };
}

/** Whether `line` starts a block that interrupts a paragraph. */
function interrupts(line) {
  if (FENCE.test(line) || RULE.test(line) || QUOTE.test(line)) return true;
  const h = HEADING.exec(line);
  if (h) return true;
  const item = itemInfo(line);
  return Boolean(item && item.content.trim() !== '' && (!item.ordered || item.start === 1));
}

/** Parses Markdown source into block objects. */
export function parseMarkdown(text) {
  const source = String(text ?? '').replace(/\r\n?/g, '\n');
  return parseBlocks(source.split('\n').map(expandTabs));
}

function parseBlocks(lines) {
  const blocks = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (BLANK.test(line)) {
      i += 1;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      const mark = fence[1];
      const indent = indentOf(line);
      const body = [];
      i += 1;
      while (i < lines.length) {
        const close = lines[i].trim();
        if (close.length >= mark.length && close === mark[0].repeat(close.length) && indentOf(lines[i]) < 4) {
          i += 1;
          break;
        }
        body.push(lines[i].slice(Math.min(indent, indentOf(lines[i]))));
        i += 1;
      }
      blocks.push({ type: 'code', lang: fence[2].replace(/[^\w+#.-]/g, '').slice(0, 30), text: body.join('\n') });
      continue;
    }
    if (indentOf(line) >= 4) {
      const body = [];
      while (i < lines.length && (indentOf(lines[i]) >= 4 || BLANK.test(lines[i]))) {
        body.push(lines[i].slice(4));
        i += 1;
      }
      while (body.length && BLANK.test(body.at(-1))) body.pop();
      blocks.push({ type: 'code', lang: '', text: body.join('\n') });
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      blocks.push({ type: 'heading', level: heading[1].length, inlines: parseInline(heading[2] ?? '') });
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      blocks.push({ type: 'rule' });
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && !BLANK.test(lines[i])) {
        const q = QUOTE.exec(lines[i]);
        inner.push(q ? q[1] : lines[i]);
        i += 1;
      }
      blocks.push({ type: 'quote', blocks: parseBlocks(inner) });
      continue;
    }
    const first = itemInfo(line);
    if (first) {
      i = parseList(lines, i, first, blocks);
      continue;
    }
    const para = [line.trim()];
    i += 1;
    while (i < lines.length && !BLANK.test(lines[i]) && !interrupts(lines[i])) {
      para.push(lines[i].trim());
      i += 1;
    }
    blocks.push({ type: 'paragraph', inlines: parseInline(para.join('\n')) });
  }
  return blocks;
}

function parseList(lines, start, first, blocks) {
  const list = { type: 'list', ordered: first.ordered, start: first.start, items: [] };
  let i = start;
  let current = null;
  let blankBefore = false;
  while (i < lines.length) {
    const line = lines[i];
    if (BLANK.test(line)) {
      blankBefore = true;
      current?.push('');
      i += 1;
      continue;
    }
    const item = itemInfo(line);
    const column = current?.column ?? first.column;
    if (item && item.indent < column && item.ordered === first.ordered && item.marker === first.marker) {
      current = [item.content];
      current.column = item.column;
      list.items.push(current);
      blankBefore = false;
      i += 1;
      continue;
    }
    if (current && indentOf(line) >= column) {
      current.push(line.slice(column));
      blankBefore = false;
      i += 1;
      continue;
    }
    // A lazy continuation of the item's paragraph.
    if (current && !blankBefore && !item && !interrupts(line)) {
      current.push(line.trim());
      i += 1;
      continue;
    }
    break;
  }
  list.items = list.items.map((itemLines) => {
    while (itemLines.length && itemLines.at(-1) === '') itemLines.pop();
    return parseBlocks(itemLines);
  });
  blocks.push(list);
  return i;
}

// ---- inline ----------------------------------------------------------------------------------

const PUNCTUATION = /[!-/:-@[-`{-~]/;
const SPACE = /\s/;
const WORD = /[\p{L}\p{N}]/u;

/** `href` when it is a safe absolute http(s) or mailto URL, else null. */
export function safeHref(raw) {
  const href = String(raw ?? '').trim();
  if (!/^(https?:\/\/|mailto:)/i.test(href) || /[\u0000-\u001f\u007f\s<>"]/.test(href)) return null;
  let url;
  try {
    url = new URL(href);
  } catch {
    return null;
  }
  if (!['http:', 'https:', 'mailto:'].includes(url.protocol)) return null;
  return url.href;
}

/** Parses inline Markdown into inline objects. */
export function parseInline(text) {
  const source = String(text ?? '');
  return new InlineParser(source).parse(0, source.length);
}

class InlineParser {
  constructor(text) {
    this.text = text;
    // Delimiters known to have no closer at or after a position: scans on hostile input stay linear.
    this.noCloser = new Map();
  }

  parse(from, to) {
    const out = [];
    let buffer = '';
    const flush = () => {
      if (buffer) out.push({ type: 'text', text: buffer });
      buffer = '';
    };
    const t = this.text;
    let i = from;
    while (i < to) {
      const c = t[i];
      if (c === '\\' && i + 1 < to && PUNCTUATION.test(t[i + 1])) {
        buffer += t[i + 1];
        i += 2;
        continue;
      }
      if (c === '\n') {
        flush();
        out.push({ type: 'break' });
        i += 1;
        continue;
      }
      if (c === '`') {
        const span = this.codeSpan(i, to);
        if (span) {
          flush();
          out.push(span.node);
          i = span.end;
          continue;
        }
        const run = /^`+/.exec(t.slice(i, to))[0];
        buffer += run;
        i += run.length;
        continue;
      }
      if (c === '[') {
        const link = this.link(i, to);
        if (link) {
          flush();
          out.push(link.node);
          i = link.end;
          continue;
        }
      }
      if (c === '<') {
        const auto = /^<((?:https?:\/\/|mailto:)[^\s<>]{1,2048})>/i.exec(t.slice(i, Math.min(to, i + MAX_URL + 2)));
        const href = auto && safeHref(auto[1]);
        if (href) {
          flush();
          out.push({ type: 'link', href, children: [{ type: 'text', text: auto[1] }] });
          i += auto[0].length;
          continue;
        }
      }
      if ((c === 'h' || c === 'H') && (i === from || !WORD.test(t[i - 1]))) {
        const bare = /^https?:\/\/[^\s<>]{1,2048}/i.exec(t.slice(i, Math.min(to, i + MAX_URL + 8)));
        if (bare) {
          let url = bare[0].replace(/[.,:;!?'"*_~]+$/, '');
          // A closing parenthesis belongs to the URL only when it opened one.
          while (url.endsWith(')') && (url.match(/\(/g) ?? []).length < (url.match(/\)/g) ?? []).length) {
            url = url.slice(0, -1);
          }
          const href = safeHref(url);
          if (href) {
            flush();
            out.push({ type: 'link', href, children: [{ type: 'text', text: url }] });
            i += url.length;
            continue;
          }
        }
      }
      if (c === '*' || c === '_' || c === '~') {
        const emphasis = this.emphasis(i, from, to);
        if (emphasis) {
          flush();
          out.push(emphasis.node);
          i = emphasis.end;
          continue;
        }
      }
      buffer += c;
      i += 1;
    }
    flush();
    return out;
  }

  codeSpan(start, to) {
    const t = this.text;
    const run = /^`+/.exec(t.slice(start, Math.min(to, start + 64)))[0];
    const key = `code${run.length}`;
    if ((this.noCloser.get(key) ?? Infinity) <= start) return null;
    let j = start + run.length;
    for (;;) {
      const k = t.indexOf(run, j);
      if (k < 0 || k >= to) {
        this.noCloser.set(key, Math.min(this.noCloser.get(key) ?? Infinity, start));
        return null;
      }
      let end = k + run.length;
      if (t[end] === '`' || t[k - 1] === '`') {
        while (t[end] === '`') end += 1;
        j = end;
        continue;
      }
      let code = t.slice(start + run.length, k).replace(/\n/g, ' ');
      if (code.length > 2 && code.startsWith(' ') && code.endsWith(' ') && code.trim()) code = code.slice(1, -1);
      return { node: { type: 'code', text: code }, end };
    }
  }

  link(start, to) {
    const t = this.text;
    let depth = 0;
    let close = -1;
    const limit = Math.min(to, start + MAX_LABEL);
    for (let j = start; j < limit; j += 1) {
      if (t[j] === '\\') {
        j += 1;
      } else if (t[j] === '`') {
        const span = this.codeSpan(j, to);
        if (span) j = span.end - 1;
      } else if (t[j] === '[') {
        depth += 1;
      } else if (t[j] === ']') {
        depth -= 1;
        if (depth === 0) {
          close = j;
          break;
        }
      }
    }
    if (close < 0 || t[close + 1] !== '(') return null;
    const m = /^\(\s*(<[^<>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+("[^"\n]*"|'[^'\n]*'))?\s*\)/.exec(
      t.slice(close + 1, Math.min(to, close + 1 + MAX_URL + 256)),
    );
    if (!m) return null;
    const end = close + 1 + m[0].length;
    const raw = m[1].startsWith('<') ? m[1].slice(1, -1) : m[1];
    const href = safeHref(raw);
    if (!href) {
      // Not a link we open: the whole source stays visible as text.
      return { node: { type: 'text', text: t.slice(start, end) }, end };
    }
    const node = { type: 'link', href, children: this.parse(start + 1, close) };
    if (m[2]) node.title = m[2].slice(1, -1);
    return { node, end };
  }

  emphasis(start, from, to) {
    const t = this.text;
    const c = t[start];
    let n = 1;
    while (t[start + n] === c && n < 3) n += 1;
    if (c === '~' && n !== 2) return null;
    const before = start > from ? t[start - 1] : ' ';
    const after = t[start + n] ?? ' ';
    if (after === undefined || SPACE.test(after) || start + n >= to) return null;
    // `_` only at word boundaries: snake_case stays as it is.
    if (c === '_' && WORD.test(before)) return null;
    const tryLength = (len) => {
      const delim = c.repeat(len);
      const key = `${delim}`;
      if ((this.noCloser.get(key) ?? Infinity) <= start) return null;
      let j = start + len;
      for (;;) {
        const k = t.indexOf(delim, j + 1);
        if (k < 0 || k >= to) {
          this.noCloser.set(key, Math.min(this.noCloser.get(key) ?? Infinity, start));
          return null;
        }
        const prev = t[k - 1];
        const next = t[k + len] ?? ' ';
        const goodClose = !SPACE.test(prev) && (c !== '_' || !WORD.test(next)) && t[k + len] !== c;
        if (goodClose && k > start + len) {
          const type = c === '~' ? 'strike' : len === 2 ? 'strong' : 'em';
          return { node: { type, children: this.parse(start + len, k) }, end: k + len };
        }
        j = k;
        while (t[j + 1] === c) j += 1;
      }
    };
    if (c === '~') return tryLength(2);
    if (n === 3) {
      const inner = tryLength(3);
      if (inner) {
        inner.node = { type: 'strong', children: [{ type: 'em', children: inner.node.children }] };
        return inner;
      }
    }
    return (n >= 2 ? tryLength(2) : null) ?? tryLength(1);
  }
}

// ---- DOM -------------------------------------------------------------------------------------

/**
 * Renders Markdown as DOM nodes (a DocumentFragment of `doc`): only createElement,
 * createTextNode, setAttribute and append, never HTML parsing.
 */
export function renderMarkdown(text, doc = globalThis.document) {
  const fragment = doc.createDocumentFragment();
  for (const block of parseMarkdown(text)) fragment.append(renderBlock(block, doc));
  return fragment;
}

function el(doc, tag, children = []) {
  const node = doc.createElement(tag);
  for (const child of children) node.append(child);
  return node;
}

function renderBlock(block, doc) {
  switch (block.type) {
    case 'paragraph':
      return el(doc, 'p', renderInlines(block.inlines, doc));
    case 'heading':
      // Inside a message, `#` is a small heading: h3 … h6.
      return el(doc, `h${Math.min(6, block.level + 2)}`, renderInlines(block.inlines, doc));
    case 'rule':
      return el(doc, 'hr');
    case 'quote':
      return el(doc, 'blockquote', block.blocks.map((b) => renderBlock(b, doc)));
    case 'code': {
      const code = el(doc, 'code', [doc.createTextNode(block.text)]);
      if (block.lang) code.setAttribute('data-lang', block.lang);
      const pre = el(doc, 'pre', [code]);
      pre.setAttribute('class', 'md-code');
      return pre;
    }
    case 'list': {
      const list = el(doc, block.ordered ? 'ol' : 'ul');
      if (block.ordered && block.start !== 1) list.setAttribute('start', String(block.start));
      for (const item of block.items) {
        // A tight item (one paragraph) shows its text without a paragraph's margins.
        const children = item.length === 1 && item[0].type === 'paragraph'
          ? renderInlines(item[0].inlines, doc)
          : item.map((b) => renderBlock(b, doc));
        list.append(el(doc, 'li', children));
      }
      return list;
    }
    default:
      return doc.createTextNode('');
  }
}

function renderInlines(inlines, doc) {
  return inlines.map((node) => renderInline(node, doc));
}

function renderInline(node, doc) {
  switch (node.type) {
    case 'text':
      return doc.createTextNode(node.text);
    case 'break':
      return el(doc, 'br');
    case 'code':
      return el(doc, 'code', [doc.createTextNode(node.text)]);
    case 'strong':
      return el(doc, 'strong', renderInlines(node.children, doc));
    case 'em':
      return el(doc, 'em', renderInlines(node.children, doc));
    case 'strike':
      return el(doc, 'del', renderInlines(node.children, doc));
    case 'link': {
      const href = safeHref(node.href);
      if (!href) return doc.createTextNode(textOf(node.children));
      const a = el(doc, 'a', renderInlines(node.children, doc));
      a.setAttribute('href', href);
      a.setAttribute('target', '_blank');
      a.setAttribute('rel', 'noopener noreferrer');
      if (node.title) a.setAttribute('title', node.title);
      return a;
    }
    default:
      return doc.createTextNode('');
  }
}

function textOf(inlines) {
  return inlines.map((n) => (n.type === 'text' || n.type === 'code' ? n.text : n.children ? textOf(n.children) : '')).join('');
}
