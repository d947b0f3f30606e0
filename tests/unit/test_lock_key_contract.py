"""README, "lock_key: what the key is made of": exactly what a lock_key callable receives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from celery_singleton_lock import SingletonTask


def test_a_callable_gets_the_bound_arguments_with_defaults_as_the_readme_says(eager_app: Celery) -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def key(*args: Any, **kwargs: Any) -> str:
        calls.append((args, kwargs))
        return "resource"

    @eager_app.task(base=SingletonTask, lock_key=key, bind=True)
    def task(self: Any, a: int, b: int = 2, *rest: int, c: int, d: int = 4, **extra: int) -> None: ...

    task.lock_key_for((), {"a": 1, "c": 3, "z": 9})  # a named: still passed by position
    task.lock_key_for((1, 5, 6, 7), {"c": 3})
    assert calls == [((1, 2), {"c": 3, "d": 4, "z": 9}), ((1, 5, 6, 7), {"c": 3, "d": 4})]


def test_the_readme_example_of_a_callable_key() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### `lock_key`: what the key is made of"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[: code.index("```")]
    app = Celery("shop", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, singleton_lock_backend="memory://")
    namespace: dict[str, Any] = {"app": app, "SingletonTask": SingletonTask}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["ship"].lock_key_for(({"warehouse": "ams"},), {}) == "res:warehouse:ams"
