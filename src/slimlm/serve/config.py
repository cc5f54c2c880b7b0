"""Settings of `slimlm serve`, checked once when the server starts.

Every limit here exists so that one client cannot take the server down for the others: a cap on
`max_tokens` bounds how long one request holds the model, a bounded queue turns overload into a
quick 429 instead of ever-growing latency, and a body limit stops a huge upload before it is
parsed. API keys are required as soon as the server listens beyond this machine, because an
open endpoint on a network is someone else's free compute.

The routing settings (policy, cascade threshold, privacy mode) are checked here too, so a typo
fails at start-up in one line rather than on the first request that needs them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from slimlm.errors import SlimlmError
from slimlm.serve.policies import POLICIES, POLICY_REGISTRY

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
PRIVACY_MODES = ("local", "redact", "off")
# Defaults per cascade metric: a mean token log-prob of -1 is a model choosing among ~3 tokens.
CASCADE_THRESHOLDS = {"mean": -1.0, "min": -4.0, "entropy": -1.5}


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def keys_from_env(name: str) -> list[str]:
    """API keys from the environment variable `name`, comma separated. Keys never go on the
    command line, where `ps` and the shell history would show them."""
    value = os.environ.get(name)
    if value is None:
        raise SlimlmError(f"--api-key-env {name}: the environment variable {name} is not set: "
                          f"export {name}=KEY1,KEY2 before starting the server")
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if not keys:
        raise SlimlmError(f"--api-key-env {name}: ${name} holds no key: set it to one or more comma-separated keys")
    return keys


def parse_adapters(items: list[str]) -> dict[str, str]:
    """`NAME=PATH` pairs (the repeatable --adapter option) as a dict."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SlimlmError(f"--adapter {item!r}: write NAME=PATH (e.g. --adapter support=./lora-support)")
        adapters[name.strip()] = path.strip()
    return adapters


@dataclass
class ServeConfig:
    """What the server accepts. Invalid settings raise SlimlmError when the config is made."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_tokens_cap: int = 2048  # a request asking for more gets a 400
    default_max_tokens: int = 512  # when a request does not say (clipped to the cap)
    max_prompt_tokens: int | None = None  # None: the model's context
    queue_size: int = 16  # requests waiting per model, besides the running ones; more get a 429
    parallel: int | None = None  # sequences decoded together (continuous batching); None: measured default
    batch_tokens: int | None = None  # tokens one batched step reads at most; None: measured default
    prefix_cache: bool = True  # a prompt reuses the cached prefix a released slot holds
    cache_ram_mib: int | None = None  # host memory for prompts' saved KV states; None: the default, 0: none
    max_body_bytes: int = 2 * 2**20  # larger request bodies get a 413 before they are parsed
    api_keys: list[str] = field(default_factory=list)  # Bearer keys; empty: no auth (loopback only)
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT adapter folder, served as MODEL:NAME
    retry_after_s: int = 1  # the Retry-After header of a 429
    n_ctx: int | None = None  # context to open the model with (llama.cpp) or to cap it at (torch)
    on_record: Callable[[dict], None] | None = None  # called with one dict per finished request
    # -- hybrid routing (hybrid.py); the large model itself is passed to create_app --
    policy: str = "local"  # a name in policies.POLICIES (local | large | cascade | learned); a request may override it
    router_path: str | None = None  # the learned router's file (`slimlm router train`)
    cascade_threshold: float | None = None  # None: CASCADE_THRESHOLDS[cascade_metric]
    cascade_metric: str = "mean"  # mean | min | entropy
    cascade_first_n: int = 16  # tokens the small model writes (held back) before the cascade decides
    privacy: str = "local"  # local | redact | off: what may leave the machine for a remote large model
    large_name: str | None = None  # the model name sent to a remote large model (None: the client's)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SlimlmError(f"--port must be between 0 and 65535 (got {self.port})")
        for name in ("max_tokens_cap", "default_max_tokens", "queue_size", "retry_after_s"):
            if getattr(self, name) < 1:
                raise SlimlmError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.parallel is not None and self.parallel < 1:
            raise SlimlmError(f"--parallel must be at least 1 (got {self.parallel})")
        if self.batch_tokens is not None and self.batch_tokens < (self.parallel or 1):
            raise SlimlmError(f"--batch-tokens ({self.batch_tokens}) must be at least --parallel ({self.parallel or 1}): "
                              "each running sequence reads one token per step")
        if self.cache_ram_mib is not None and self.cache_ram_mib < 0:
            raise SlimlmError(f"--cache-ram must be 0 (off) or more MiB (got {self.cache_ram_mib})")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise SlimlmError(f"max_prompt_tokens must be at least 1 (got {self.max_prompt_tokens})")
        if self.n_ctx is not None and self.n_ctx < 16:
            raise SlimlmError(f"--n-ctx must be at least 16 (got {self.n_ctx})")
        if self.max_body_bytes < 1024:
            raise SlimlmError(f"max_body_bytes must be at least 1024 (got {self.max_body_bytes})")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_cap)
        self.api_keys = [k for k in self.api_keys if k]
        if not self.api_keys and not is_loopback(self.host):
            raise SlimlmError(f"--host {self.host} accepts connections from other machines: require API keys "
                              "with --api-key-env NAME (keys in $NAME, comma separated), or keep --host 127.0.0.1")
        if self.policy not in POLICIES:
            raise SlimlmError(f"--policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        POLICY_REGISTRY[self.policy].check(self)
        if self.cascade_metric not in CASCADE_THRESHOLDS:
            raise SlimlmError(f"--cascade-metric {self.cascade_metric!r}: choose one of "
                              f"{', '.join(CASCADE_THRESHOLDS)}")
        if self.cascade_threshold is None:
            self.cascade_threshold = CASCADE_THRESHOLDS[self.cascade_metric]
        if self.cascade_first_n < 1:
            raise SlimlmError(f"--cascade-tokens must be at least 1 (got {self.cascade_first_n})")
        if self.privacy not in PRIVACY_MODES:
            raise SlimlmError(f"--privacy {self.privacy!r}: choose one of {', '.join(PRIVACY_MODES)}")
        for name in self.adapters:
            if not _ADAPTER_NAME.match(name):
                raise SlimlmError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (it is served "
                                  "as MODEL:NAME)")
