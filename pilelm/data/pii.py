"""PII scrubbing: e-mail and IP addresses, phone and credit-card numbers and secret/API keys
become typed placeholders; each replacement is counted per type.

The patterns follow the BigCode PII pipeline's choices (Allal et al. 2023, "SantaCoder",
§3.2): only public IP addresses are replaced (127.0.0.1, 192.168.x.x, documentation ranges
are not personal), and candidate card numbers must pass the Luhn checksum and start with a
card network's prefix (ISO/IEC 7812) so that long numbers in maths or code survive.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE_NUMBER>",
    "credit_card": "<CREDIT_CARD>",
    "secret": "<SECRET_KEY>",
}

# Every scanning pattern starts with a literal or a small character class, so the regex
# engine's fast prefix scan skips most text; boundaries are checked in Python on the rare
# candidates (a look-behind at the start would force a full match attempt at every position).
_EMAIL_DOMAIN = re.compile(r"@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
_DIGITS = re.compile(r"\d[\d .()/-]{5,}\d")
_IPV4 = re.compile(r"(?<![\d.])(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}(?!\.?\d)")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|6011|65|35)")
# North American style with separators, or international with a leading +.
_PHONE = re.compile(
    r"(?<![\d+])(?:\(\d{3}\)[ .-]?\d{3}[.-]|\d{3}([.-])\d{3}\1)\d{4}(?![\d-])"
    r"|(?<![\d+])\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}(?![\d-])"
)
_IPV6_SEED = re.compile(r"::|:[0-9A-Fa-f]{1,4}:")
_HEXCOLON = re.compile(r"[0-9A-Fa-f:]*")
# Key shapes with a fixed prefix (the formats their issuers document): literal -> pattern.
_SECRETS = {
    "AKIA": r"AKIA[0-9A-Z]{16}", "ASIA": r"ASIA[0-9A-Z]{16}",  # AWS access key ids
    "ghp_": r"ghp_[A-Za-z0-9]{36,255}", "gho_": r"gho_[A-Za-z0-9]{36,255}",  # GitHub tokens
    "ghu_": r"ghu_[A-Za-z0-9]{36,255}", "ghs_": r"ghs_[A-Za-z0-9]{36,255}",
    "ghr_": r"ghr_[A-Za-z0-9]{36,255}", "github_pat_": r"github_pat_[A-Za-z0-9_]{60,255}",
    "xox": r"xox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    "AIza": r"AIza[0-9A-Za-z_-]{35}",  # Google API keys
    "k_live_": r"[sr]k_live_[0-9A-Za-z]{16,}", "k_test_": r"[sr]k_test_[0-9A-Za-z]{16,}",  # Stripe
    "sk-": r"sk-(?:proj-)?[A-Za-z0-9_-]{32,}",  # OpenAI-style
    "eyJ": r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
    "PRIVATE KEY-----": r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]{0,8000}?-----END (?:[A-Z]+ )*PRIVATE KEY-----",
}
_SECRET_RE = {k: re.compile(v) for k, v in _SECRETS.items()}
_WORDISH = re.compile(r"[A-Za-z0-9_]")
_VERSION_BEFORE = re.compile(r"(?:version|release|v)\s*$", re.IGNORECASE)


@dataclass
class PiiConfig:
    enabled: bool = True
    """Replace personal data and secrets with typed placeholders."""
    types: list[str] = field(default_factory=lambda: list(PLACEHOLDERS))
    """Kinds to replace: email, ip_address, phone, credit_card, secret."""
    skip: list[str] = field(default_factory=lambda: ["DM Mathematics"])
    """Components left untouched (generated maths has number patterns, no personal data)."""

    def __post_init__(self) -> None:
        bad = [t for t in self.types if t not in PLACEHOLDERS]
        if bad:
            raise ValueError(f"pii.types: unknown {bad}; choose from {', '.join(PLACEHOLDERS)}")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_public_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def _is_card(digits_and_seps: str) -> bool:
    digits = digits_and_seps.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and _luhn_ok(digits)


Span = tuple[int, int, str]


def _secret_spans(text: str) -> list[Span]:
    spans = []
    for lit, pattern in _SECRET_RE.items():
        if lit not in text:
            continue
        for m in pattern.finditer(text):
            a, b = m.span()
            if a and _WORDISH.match(text, a - 1) and not lit.startswith("PRIVATE"):
                continue  # inside a longer identifier
            spans.append((a, b, "secret"))
    return spans


def _email_spans(text: str) -> list[Span]:
    spans = []
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        if local is None:
            continue
        a = local.start()
        if a and text[a - 1] in "._%+-" or (a and text[a - 1].isalnum()):
            continue
        spans.append((a, m.end(), "email"))
    return spans


def _digit_spans(text: str, kinds: set[str]) -> list[Span]:
    """IPv4 addresses, card and phone numbers inside runs of digits and separators."""
    spans = []
    for m in _DIGITS.finditer(text):
        a, b = m.span()
        if a and text[a - 1] in "+(" and "phone" in kinds and not (a > 1 and (text[a - 2].isalnum() or text[a - 2] == "+")):
            a -= 1  # international prefix or area code in brackets (but not C++14)
        if a and (text[a - 1].isalpha() or text[a - 1] == "_"):
            continue
        if b < len(text) and (text[b].isalpha() or text[b] == "_"):
            continue
        chunk = text[a:b]
        found: list[Span] = []
        if "ip_address" in kinds and "." in chunk:
            found += [(a + x.start(), a + x.end(), "ip_address") for x in _IPV4.finditer(chunk)
                      if _is_public_ip(x.group())
                      and not _VERSION_BEFORE.search(text, max(0, a + x.start() - 10), a + x.start())]
        if "credit_card" in kinds:
            found += [(a + x.start(), a + x.end(), "credit_card") for x in _CARD.finditer(chunk)
                      if _is_card(x.group())]
        if "phone" in kinds:
            found += [(a + x.start(), a + x.end(), "phone") for x in _PHONE.finditer(chunk)]
        spans += found
    return spans


def _ipv6_spans(text: str) -> list[Span]:
    spans: list[Span] = []
    end = -1
    for m in _IPV6_SEED.finditer(text):
        if m.start() < end:
            continue
        a = m.start()
        while a > 0 and (text[a - 1] in ":" or text[a - 1] in "0123456789abcdefABCDEF"):
            a -= 1
        b = _HEXCOLON.match(text, a).end()
        end = b
        cand = text[a:b].strip(":") if text[a:b].count("::") == 0 else text[a:b]
        if sum(1 for g in cand.split(":") if g) < 3 or (a and _WORDISH.match(text, a - 1)) or (b < len(text) and _WORDISH.match(text, b)):
            continue
        if _is_public_ip(cand):
            spans.append((a, b, "ip_address"))
    return spans


class PiiScrubber:
    """``scrub(text) -> (text, {kind: count})``. Overlapping finds keep the earliest, then
    the longest (so a key that contains digits is replaced whole, as a secret)."""

    def __init__(self, cfg: PiiConfig) -> None:
        self.kinds = set(cfg.types)

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        if "secret" in self.kinds:
            spans += _secret_spans(text)
        if "email" in self.kinds and "@" in text:
            spans += _email_spans(text)
        if self.kinds & {"ip_address", "credit_card", "phone"}:
            spans += _digit_spans(text, self.kinds)
        if "ip_address" in self.kinds and ":" in text:
            spans += _ipv6_spans(text)
        spans.sort(key=lambda s: (s[0], s[0] - s[1]))
        out: list[Span] = []
        for s in spans:
            if not out or s[0] >= out[-1][1]:
                out.append(s)
        return out

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        spans = self.find(text)
        if not spans:
            return text, {}
        counts: dict[str, int] = {}
        parts, pos = [], 0
        for a, b, kind in spans:
            parts.append(text[pos:a])
            parts.append(PLACEHOLDERS[kind])
            counts[kind] = counts.get(kind, 0) + 1
            pos = b
        parts.append(text[pos:])
        return "".join(parts), counts
