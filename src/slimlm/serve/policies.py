"""The routing policies of `slimlm serve --policy`: one small class each, in a registry that
hybrid.py dispatches through, ServeConfig checks names against, and the CLI's `--policy` help is
generated from.

A policy here is the server's side of a routing policy: it builds the decision-maker (the
policies of slimlm.routing, which `slimlm router eval` judges without a server) from the
server's settings, says whether it needs a large model, and decides each request:
- from the prompt, before anything is generated (local, large, learned): `decide(prompt)`;
  one that does real work per prompt (an encoder's forward pass) sets `blocking`, and runs off
  the event loop;
- or after the small model's first tokens (cascade): `choose` answers a deferred Decision and
  `answer` runs the request (serve/cascade.py holds the mechanics).
A new policy is one class decorated with `@register_policy("name")`, in its own module plus one
import line in slimlm/serve/__init__.py, or here beside the built-in ones.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Mapping

from slimlm.errors import SlimlmError
from slimlm.registry import Registry

log = logging.getLogger("slimlm.serve")
DEFERRED = "deferred"  # a Decision's route while the policy waits for the small model's first tokens


class RoutingPolicy:
    """One routing policy. Subclass it, set `help`, override `decide` (or `choose` and `answer`
    for a policy that decides after generating), and decorate it with `@register_policy`. The
    built-ins wrap a policy of slimlm.routing (`inner`), whose `decide` is the default here."""

    name = ""  # set by register_policy
    help = ""  # one line: what it decides from, for `slimlm serve --help`
    needs_large = True  # it may send requests to --large, so the server refuses to start without one
    blocking = False  # decide() is slow enough (a forward pass) to run in a worker thread
    labelled = False  # escalations are counted as "policy NAME" in the metrics rather than by reason

    @classmethod
    def check(cls, config) -> None:
        """A SlimlmError if the server's settings (a ServeConfig) cannot run this policy."""

    def __init__(self, inner=None) -> None:
        self.inner = inner  # the slimlm.routing policy that decides, for the built-ins

    @classmethod
    def build(cls, config) -> RoutingPolicy:
        """The policy for a server started with `config`."""
        return cls()

    def decide(self, prompt: str):
        """A Decision (route "local" or "large", and a reason) from the prompt's text."""
        if self.inner is None:
            raise NotImplementedError(f"policy '{self.name}' does not decide from the prompt")
        return self.inner.decide(prompt)

    async def choose(self, call):
        """The Decision for one request (a hybrid.Call); DEFERRED routes it to `answer`."""
        return await ask(self, call.text, call.body, blocking=self.blocking,
                         label=f"policy {self.name}" if self.labelled else None)

    async def answer(self, hybrid, server, call, task, decision):
        """Run a request this policy deferred (cascade); not called for the other policies."""
        raise NotImplementedError(f"policy '{self.name}' does not defer its decisions")


POLICY_REGISTRY: Registry[RoutingPolicy] = Registry("routing policy", RoutingPolicy)
# Class decorator: register a RoutingPolicy under `name` (the value of --policy).
register_policy = POLICY_REGISTRY.register


def sends_to_large(name: str | None) -> bool:
    """Whether --policy NAME needs --large. An unknown name counts as needing it, as before the
    registry: the CLI then asks for --large first, and ServeConfig names the policies."""
    cls = POLICY_REGISTRY.get(name) if name is not None else None
    return name is not None and (cls is None or cls.needs_large)


POLICIES: Mapping[str, str] = POLICY_REGISTRY.helps  # name -> help, read live


async def ask(router, text: str, body: dict, *, blocking: bool = False, label: str | None = None):
    """A policy's or Router hook's Decision; a failing one answers locally (private, always
    there). `decide` may be sync or async and may take the prompt's text alone."""
    from slimlm.serve.types import APIError, Decision

    decide = router.decide
    try:
        one_arg = len(inspect.signature(decide).parameters) == 1
    except (TypeError, ValueError):
        one_arg = False
    try:
        if blocking:
            decision = await asyncio.to_thread(decide, text)
        else:
            decision = decide(text) if one_arg else decide(text, body)
            if inspect.isawaitable(decision):
                decision = await decision
    except Exception as exc:  # noqa: BLE001 - local is the safe side
        log.exception("the router failed")
        return Decision("local", f"the router failed ({type(exc).__name__}), answered locally")
    if decision.route not in ("local", "large"):
        raise APIError(500, f"the router chose route {decision.route!r}: routes are 'local' and 'large'",
                       type_="server_error")
    return Decision(decision.route, decision.reason, getattr(decision, "score", None), label=label)


async def ask_hook(hook, text: str, body: dict):
    """A Router hook's Decision. A hook that is one of the registered policies' routers (its
    `name` says which, e.g. a LearnedRouter) runs and is counted as that policy would be."""
    cls = POLICY_REGISTRY.get(getattr(hook, "name", None) or "")
    label = f"policy {cls.name}" if cls is not None and cls.labelled else None
    return await ask(hook, text, body, blocking=cls is not None and cls.blocking, label=label)


# -- the built-in policies --------------------------------------------------------------------
@register_policy("local")
class Local(RoutingPolicy):
    help = "every request stays on this machine"
    needs_large = False

    @classmethod
    def build(cls, config) -> Local:
        from slimlm.routing import LocalPolicy

        return cls(LocalPolicy())


@register_policy("large")
class Large(RoutingPolicy):
    help = "every request goes to --large"
    labelled = True

    @classmethod
    def build(cls, config) -> Large:
        from slimlm.routing import LargePolicy

        return cls(LargePolicy())


@register_policy("cascade")
class Cascade(RoutingPolicy):
    help = ("the small model writes its first --cascade-tokens (held back); below --cascade-threshold "
            "confidence, --large answers instead")

    @classmethod
    def build(cls, config) -> Cascade:
        from slimlm.routing import CascadePolicy

        return cls(CascadePolicy(config.cascade_threshold, config.cascade_metric, config.cascade_first_n))

    async def choose(self, call):
        from slimlm.serve.types import Decision

        return Decision(DEFERRED, "cascade")

    async def answer(self, hybrid, server, call, task, decision):
        from slimlm.serve.cascade import answer_cascade

        return await answer_cascade(hybrid, server, call, task, decision, self.inner)


@register_policy("learned")
class Learned(RoutingPolicy):
    help = "a classifier trained by `slimlm router train` reads the prompt (--router PATH)"
    blocking = True  # an encoder's forward pass: off the event loop
    labelled = True

    @classmethod
    def check(cls, config) -> None:
        if not config.router_path:
            raise SlimlmError("--policy learned needs --router PATH (a router written by `slimlm router train`)")

    @classmethod
    def build(cls, config) -> Learned:
        from slimlm.routing import LearnedRouter

        policy = cls(LearnedRouter.load(config.router_path))
        policy.decide("warm-up")  # loads the encoder now, not on the first request
        return policy
