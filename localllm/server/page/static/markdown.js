// A small Markdown renderer for model answers (localllm's own, no dependencies).
// Every character of the input is HTML-escaped before any markup is added, so a model's text
// can never become HTML; links are kept only for http(s) and mailto addresses.
// Covers what models write: fenced code (an unclosed fence while streaming counts as open to the
// end), headings, lists, quotes, rules, tables, `code`, **bold**, *italic*, ~~strike~~, [links](...).
"use strict";

(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Inline markup on one block's text: code spans first (their contents stay literal).
  function inline(text) {
    const spans = [];
    let out = text.replace(/\u0000/g, "").replace(/(`+)([\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => {
      spans.push("<code>" + escapeHtml(code.trim() === "" ? code : code.replace(/^ (.*) $/, "$1")) + "</code>");
      return "\u0000" + (spans.length - 1) + "\u0000";
    });
    out = escapeHtml(out);
    out = out.replace(/\[([^\]\n]+)\]\(((?:https?:\/\/|mailto:)[^\s()]+)\)/g,
      (_, label, href) => '<a href="' + href + '" rel="noopener noreferrer" target="_blank">' + label + "</a>");
    out = out.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>");
    out = out.replace(/__(?=\S)([\s\S]*?\S)__/g, "<strong>$1</strong>");
    out = out.replace(/(^|[^*\w])\*(?=\S)([^*\n]*?\S)\*(?!\*)/g, "$1<em>$2</em>");
    out = out.replace(/(^|[^_\w])_(?=\S)([^_\n]*?\S)_(?![_\w])/g, "$1<em>$2</em>");
    out = out.replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
    out = out.replace(/\n/g, "<br>");
    return out.replace(/\u0000(\d+)\u0000/g, (_, i) => spans[Number(i)]);
  }

  function codeBlock(lang, lines) {
    const cls = lang ? ' class="language-' + escapeHtml(lang) + '"' : "";
    const label = lang ? '<span class="code-lang">' + escapeHtml(lang) + "</span>" : "";
    return '<div class="code-block">' + label + "<pre><code" + cls + ">" +
      escapeHtml(lines.join("\n")) + "</code></pre></div>";
  }

  function tableRow(line) {
    return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  }

  const RULE = /^ {0,3}([-*_])( *\1){2,} *$/;
  const HEADING = /^ {0,3}(#{1,6}) +(.*?)(?: +#+)? *$/;
  const FENCE = /^ {0,3}(`{3,}|~{3,}) *([\w+#.-]*).*$/;
  const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)]) +(.*)$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const TABLE_SEP = /^ *\|? *:?-{2,}:? *(\| *:?-{2,}:? *)*\|? *$/;

  function blocks(lines) {
    const html = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (line.trim() === "") { i++; continue; }
      if ((m = line.match(FENCE))) {
        const fence = m[1];
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
        i++; // the closing fence (or the end, while an answer is still streaming)
        html.push(codeBlock(m[2], body));
        continue;
      }
      if ((m = line.match(HEADING))) {
        const level = m[1].length;
        html.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
        i++;
        continue;
      }
      if (RULE.test(line)) { html.push("<hr>"); i++; continue; }
      if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && (m = lines[i].match(QUOTE))) { body.push(m[1]); i++; }
        html.push("<blockquote>" + blocks(body) + "</blockquote>");
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        const head = tableRow(line);
        i += 2;
        const rows = [];
        while (i < lines.length && lines[i].includes("|") && lines[i].trim() !== "") rows.push(tableRow(lines[i++]));
        html.push('<div class="table-wrap"><table><thead><tr>' +
          head.map((c) => "<th>" + inline(c) + "</th>").join("") + "</tr></thead><tbody>" +
          rows.map((r) => "<tr>" + r.map((c) => "<td>" + inline(c) + "</td>").join("") + "</tr>").join("") +
          "</tbody></table></div>");
        continue;
      }
      if ((m = line.match(ITEM))) {
        const ordered = /\d/.test(m[2]);
        const start = ordered ? parseInt(m[2], 10) : 1;
        const items = [];
        while (i < lines.length) {
          const item = lines[i].match(ITEM);
          if (item && /\d/.test(item[2]) === ordered && item[1].length <= m[1].length + 1) {
            items.push([item[3]]);
            i++;
          } else if (items.length && lines[i].trim() !== "" && /^\s+/.test(lines[i])) {
            items[items.length - 1].push(lines[i].replace(/^ {1,4}/, "")); // nested or continued
            i++;
          } else if (lines[i].trim() === "" && i + 1 < lines.length && (lines[i + 1].match(ITEM) || /^\s+\S/.test(lines[i + 1]))) {
            i++; // a loose list: blank lines between items
          } else {
            break;
          }
        }
        const tag = ordered ? "ol" : "ul";
        const attr = ordered && start !== 1 ? ' start="' + start + '"' : "";
        html.push("<" + tag + attr + ">" + items.map((it) => {
          const rest = it.slice(1);
          const nested = rest.length && rest.some((l) => ITEM.test(l) || FENCE.test(l));
          return "<li>" + inline(it[0]) + (nested ? blocks(rest) : rest.length ? "<br>" + inline(rest.join("\n")) : "") + "</li>";
        }).join("") + "</" + tag + ">");
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() !== "" && !FENCE.test(lines[i]) &&
             !HEADING.test(lines[i]) && !QUOTE.test(lines[i]) && !(para.length && ITEM.test(lines[i]))) {
        para.push(lines[i++]);
      }
      html.push("<p>" + inline(para.join("\n")) + "</p>");
    }
    return html.join("");
  }

  function render(text) {
    return blocks(String(text).replace(/\r\n?/g, "\n").split("\n"));
  }

  window.LocalMarkdown = { render, escapeHtml };
})();
