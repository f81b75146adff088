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
from collections.abc import Callable
from dataclasses import dataclass, field

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE_NUMBER>",
    "credit_card": "<CREDIT_CARD>",
    "secret": "<SECRET_KEY>",
}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?!\w)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
                   r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}(?![\w:])")
# North American style with separators, or international with a leading +.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-])"
    r"|(?<![\w+])\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}(?![\w-])"
)
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|6011|65|35)")
# Key shapes with a fixed prefix (the formats their issuers document).
_SECRET = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,255}\b"  # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{60,255}\b"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,}\b"  # Stripe
    r"|\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}"  # OpenAI-style
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]{0,8000}?-----END (?:[A-Z]+ )*PRIVATE KEY-----"
)


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


def _card(m: re.Match[str]) -> bool:
    digits = re.sub(r"[ -]", "", m.group())
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and _luhn_ok(digits)


# kind -> (quick test that must hold for a match to be possible, pattern, extra check)
_RULES: dict[str, tuple[Callable[[str], bool], re.Pattern[str], Callable[[re.Match[str]], bool] | None]] = {
    "secret": (lambda t: True, _SECRET, None),
    "email": (lambda t: "@" in t, _EMAIL, None),
    "ip_address": (lambda t: "." in t or ":" in t, _IPV4, lambda m: _is_public_ip(m.group())),
    "ipv6": (lambda t: "::" in t or t.count(":") >= 7, _IPV6, lambda m: _is_public_ip(m.group())),
    "credit_card": (lambda t: True, _CARD, _card),
    "phone": (lambda t: True, _PHONE, None),
}


class PiiScrubber:
    """``scrub(text) -> (text, {kind: count})``; rules run in a fixed order (secrets first,
    so a key containing digits is not half-replaced as a phone number)."""

    def __init__(self, cfg: PiiConfig) -> None:
        self.kinds = [k for k in _RULES if (k if k != "ipv6" else "ip_address") in cfg.types]

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        counts: dict[str, int] = {}
        for kind in self.kinds:
            quick, pattern, check = _RULES[kind]
            if not quick(text):
                continue
            name = "ip_address" if kind == "ipv6" else kind
            n = 0

            def repl(m: re.Match[str], check=check, name=name) -> str:
                nonlocal n
                if check is not None and not check(m):
                    return m.group()
                n += 1
                return PLACEHOLDERS[name]

            text = pattern.sub(repl, text)
            if n:
                counts[name] = counts.get(name, 0) + n
        return text, counts
