"""``mixtral-jax plan``: will it fit? Compile train and serving programs ahead of time, from shapes alone."""

from .training import analytic, compile_or_verdict, plan, plan_example, plan_main, plan_parser, shard_bytes  # noqa: F401
