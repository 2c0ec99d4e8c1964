//! The default rule set (see `rules.md` for what it catches and what it lets through).
//!
//! Every pattern runs over the payload's bytes with `(?i-u)`: ASCII case-insensitive,
//! and no Unicode classes, so `\s`, `\w` and `\b` are ASCII and the lazy DFA never has
//! to give up on a non-ASCII byte.
//!
//! They are text rules: only payloads that are valid UTF-8 get them. Even so, a gap
//! between two delimiters (a quoted string, a command in backticks, a `/* */` comment)
//! is bounded and spans no control byte but a tab (`` [^`\x00-\x08\x0a-\x1f\x7f]{0,256} ``):
//! binary data that happens to be valid UTF-8 is full of control bytes, text is not.
//!
//! A bounded gap is not in the pattern set as it is, though: the lazy DFA needs a state
//! for each position in each gap, and for each combination of positions in gaps open at
//! once, so a payload that keeps reopening several gaps at co-prime intervals makes it
//! build a new state at almost every byte, until it gives up and the set runs on the
//! `PikeVM` (see the [cost section](super#limits)). So a rule with gaps is in the set with
//! its gaps unbounded ([`DefaultRule::pattern`], one state per gap, whatever the
//! payload), and the rule itself ([`DefaultRule::bounded`]) is checked, on its own, only
//! over a payload where that matched: every match of the bounded form is one of the
//! unbounded form, so nothing is missed, and the rule is the bounded form.

use crate::security::Severity;

/// One pattern of the default set.
pub(super) struct DefaultRule {
    pub(super) name: &'static str,
    pub(super) severity: Severity,
    /// What the pattern set looks for: the rule, or for a rule with bounded gaps, the
    /// rule with its gaps unbounded.
    pub(super) pattern: &'static str,
    /// The rule with its bounded gaps, checked where `pattern` matched; `None` when
    /// `pattern` is the rule.
    pub(super) bounded: Option<&'static str>,
}

const fn rule(name: &'static str, severity: Severity, pattern: &'static str) -> DefaultRule {
    DefaultRule {
        name,
        severity,
        pattern,
        bounded: None,
    }
}

/// A rule with bounded gaps: `unbounded` in the set, `bounded` checked where it matched.
/// Both are made by one macro, given `"*"` or the bound for the gaps.
const fn gapped(
    name: &'static str,
    severity: Severity,
    unbounded: &'static str,
    bounded: &'static str,
) -> DefaultRule {
    DefaultRule {
        name,
        severity,
        pattern: unbounded,
        bounded: Some(bounded),
    }
}

const SQL: &str = "sql_injection";
const CMD: &str = "command_injection";
const XSS: &str = "xss";
const PATH: &str = "path_traversal";

/// The commands the command-injection rules know, as one alternation: a name after a
/// shell separator, or in backticks, is taken for a command only if it is one of these.
macro_rules! commands {
    () => {
        "cat|ls|rm|cp|mv|chmod|chown|wget|curl|bash|sh|zsh|dash|python[0-9.]*|perl|php|ruby|\
         busybox|tftp|echo|id|whoami|uname|ifconfig|pwd|reboot|nc|ncat|netcat|telnet"
    };
}

/// A quoted tautology, its quoted strings `$gap` long.
macro_rules! tautology {
    ($gap:literal) => {
        concat!(
            r#"(?i-u)'\s*(?:or|and|\|\||&&)\s*(?:'[^'\x00-\x08\x0a-\x1f\x7f]"#,
            $gap,
            r#"'|"[^"\x00-\x08\x0a-\x1f\x7f]"#,
            $gap,
            r#""|\d+|[a-z_]+)\s*(?:=|<>|!=|<|>|\blike\b)"#
        )
    };
}

/// `UNION [ALL] SELECT`, its `/* */` comments `$gap` long.
macro_rules! union_select {
    ($gap:literal) => {
        concat!(
            r"(?i-u)\bunion(?:\s|\+|/\*[^*\x00-\x08\x0a-\x1f\x7f]",
            $gap,
            r"\*/)+(?:all(?:\s|\+|/\*[^*\x00-\x08\x0a-\x1f\x7f]",
            $gap,
            r"\*/)+)?select\b"
        )
    };
}

/// `$(`, a command or a path in backticks `$gap` long, `${IFS}`, `/bin/sh`.
macro_rules! backticks {
    ($gap:literal) => {
        concat!(
            r"(?i-u)\$\(\s*[a-z/.]|`\s*(?:\.{0,2}/|(?:",
            commands!(),
            r")\b)[^`\x00-\x08\x0a-\x1f\x7f]",
            $gap,
            r"`|\$\{?ifs\b|/bin/(?:ba|z|da)?sh\b"
        )
    };
}

/// In order: where several match a blocked message, the first one names the block.
pub(super) const DEFAULT_RULES: &[DefaultRule] = &[
    // ' OR '1'='1, 1' and 2>1, ' or x like
    gapped(SQL, Severity::High, tautology!("*"), tautology!("{0,64}")),
    // " or ""=", or 1=1
    rule(
        SQL,
        Severity::High,
        r#"(?i-u)"\s*or\s*""\s*=|\b(?:or|and)\s+\d+\s*=\s*\d+\b"#,
    ),
    // UNION SELECT, union/**/all/**/select, union+select
    gapped(
        SQL,
        Severity::High,
        union_select!("*"),
        union_select!("{0,64}"),
    ),
    // ; DROP TABLE, ; delete from, ; insert into t (, ; update t set c=, ; shutdown --:
    // after the `;`, a statement (`insert into slot 2`, `update firmware set to` are not)
    rule(
        SQL,
        Severity::High,
        r#"(?i-u);\s*(?:(?:drop|truncate|alter|create)\s+(?:table|database|schema|user)\b|delete\s+from\b|insert\s+into\s+[\w.`"\[\]]+\s*(?:\(|values\b|select\b|default\b|set\b)|update\s+[\w.`"\[\]]+\s+set\s+[\w.`"\[\]]+\s*=|shutdown\s*(?:$|;|--|#|/\*|with\s+nowait\b)|exec(?:ute)?\s+(?:xp|sp)_)"#,
    ),
    // admin'--, x'/*, x'# and admin' -- at the end; blind injection with a number of
    // seconds; well-known catalogue names. A quote then `--` or `#` followed by more
    // text is prose ('A' -- offline, '#ff0000', 'run.sh' --force, sensors' #3).
    rule(
        SQL,
        Severity::High,
        r#"(?i-u)'(?:--|/\*|#(?:$|[\s"']))|'\s+(?:--|#)[\s-]*(?:$|")|(?:'|\b(?:or|and))\s*(?:sleep|pg_sleep|benchmark)\s*\(\s*\d|\bwaitfor\s+delay\s+'|\b(?:information_schema|xp_cmdshell|sysobjects)\b"#,
    ),
    // ; cat /etc/passwd, && wget http://.., | sh -c
    rule(
        CMD,
        Severity::Critical,
        r"(?i-u)[;&|`]\s*(?:cat|ls|rm|cp|mv|chmod|chown|wget|curl|bash|sh|zsh|dash|python[0-9.]*|perl|php|ruby|busybox|tftp|echo)\s+(?:[-/.~$'\x22]|https?:|ftp:)",
    ),
    // ; id, | whoami, && uname -a, `id`, ;id;ls: after the command, the end, a flag, a
    // comment or a backtick, or another separator and a command (ts;id;temp and
    // name | id | value are not); `reboot`, an English word, not at the end
    rule(
        CMD,
        Severity::Critical,
        concat!(
            r"(?i-u)[;&|`]\s*(?:(?:id|whoami|uname|ifconfig|pwd)\s*(?:$|[#)`]|-[a-z]|[;&|]+\s*(?:$|(?:",
            commands!(),
            r")\b))|reboot\s*(?:[#)`]|-[a-z]|[;&|]+\s*(?:$|(?:",
            commands!(),
            r")\b)))"
        ),
    ),
    // | nc host port
    rule(
        CMD,
        Severity::Critical,
        r"(?i-u)[;&|`]\s*(?:nc|ncat|netcat|telnet)\s+(?:-[a-z]+\s+)*[a-z0-9_.:-]+\s+\d+\b",
    ),
    // $(curl ..), `id`, `/bin/x`, ${IFS}, /bin/sh: in backticks, a command or a path
    // (`config.json` and SQL's `temp` are neither)
    gapped(
        CMD,
        Severity::Critical,
        backticks!("*"),
        backticks!("{0,256}"),
    ),
    // <script>, </script>, <iframe, <object, <embed: the name right after `<`, as HTML
    // opens a tag (`level < base` is text)
    rule(
        XSS,
        Severity::Medium,
        r"(?i-u)</?script\b|<(?:iframe|object|embed|applet|frameset|base|meta)\b",
    ),
    // onerror=, onload=, ...
    rule(
        XSS,
        Severity::Medium,
        r"(?i-u)\bon(?:error|load|unload|click|dblclick|mouse[a-z]+|focus[a-z]*|blur|key[a-z]+|submit|change|input|abort|animation[a-z]+|toggle|pointer[a-z]+|begin|wheel|scroll|message|touch[a-z]+|drag[a-z]*|copy|paste|play)\s*=",
    ),
    // javascript:, vbscript:, data:text/html, document.cookie
    rule(
        XSS,
        Severity::Medium,
        r"(?i-u)\b(?:java|vb)script\s*:|\bdata\s*:\s*text/html|\bdocument\s*\.\s*(?:cookie|write|domain)\b",
    ),
    // ../../, ..\..\, ....//....//, %2e%2e%2f%2e%2e%2f
    rule(
        PATH,
        Severity::High,
        r"(?i-u)(?:\.|%2e){2,}(?:/|\\|%2f|%5c){1,2}(?:\.|%2e){2,}(?:/|\\|%2f|%5c)|%c0%af|%c1%9c",
    ),
    // /etc/passwd, /proc/self/, \windows\system32, win.ini
    rule(
        PATH,
        Severity::High,
        r"(?i-u)/etc/(?:passwd|shadow)\b|/proc/self/|\\windows\\(?:system32|win\.ini)|\bboot\.ini\b",
    ),
];
