"""Registries of the pluggable parts (flatness methods, CL strategies): name -> config class + class.

A part registers itself in its own file, its config class beside it:

    @METHODS.register("sam", SamConfig)
    class Sam(FlatnessMethod): ...

A registry finds its parts without an import list: the first time it is asked (`load`), it imports
every module of its package and then every entry point of its group that installed distributions
declare (`[project.entry-points."cl_flat.flatness"] name = "module"` or `"module:Class"`), so an
outside method is loaded, validated and listed like a built-in. Two parts with one name, or an entry
point that fails to import or registers nothing, are refused with one message naming the sources.
The config schema takes the discriminated union of the registered config classes (`config_union`),
so the YAML accepts exactly what is registered.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, Field

from cl_flat.errors import PluginError

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Entry:
    name: str
    config_class: type[BaseModel]
    cls: type
    source: str  # the defining module, or "<distribution> (entry point <group>: <name>)" for an outside part


class Registry:
    """Parts of one kind, keyed by the value of their config's `tag` field (e.g. `method: sam`)."""

    def __init__(self, kind: str, package: str, group: str, tag: str, decorator: str):
        self.kind, self.package, self.group, self.tag = kind, package, group, tag
        self.decorator = decorator  # how a part registers, for the error messages
        self._entries: dict[str, Entry] = {}
        self._loaded = False
        self._error: PluginError | None = None
        self._plugin: str | None = None  # the entry point being loaded: the source of what registers now

    def register(self, name: str, config_class: type[BaseModel]) -> Callable[[T], T]:
        """Class decorator: the part `name`, configured by `config_class` (whose `tag` field is
        `Literal[name]`); sets `cls.name` and `cls.config_class`."""
        field = config_class.model_fields.get(self.tag)
        if field is None or get_origin(field.annotation) is not Literal or get_args(field.annotation) != (name,):
            raise PluginError(f"{self.kind} {name!r}: its config class {config_class.__qualname__} must declare "
                              f"`{self.tag}: Literal[{name!r}]`")

        def add(cls: T) -> T:
            source = self._plugin or cls.__module__
            known = self._entries.get(name)
            if known is not None and known.cls is not cls:
                raise PluginError(f"{self.kind} {name!r} is registered twice: by {known.source} "
                                  f"({known.cls.__qualname__}) and by {source} ({cls.__qualname__})")
            cls.name, cls.config_class = name, config_class
            self._entries[name] = Entry(name, config_class, cls, source)
            return cls

        return add

    def load(self) -> dict[str, Entry]:
        """Every part: the package's own modules, then the installed entry points (once per process)."""
        if not self._loaded:
            self._loaded = True  # first: a module imported below may ask for the registry again
            try:
                package = importlib.import_module(self.package)
                for module in pkgutil.iter_modules(package.__path__, prefix=f"{self.package}."):
                    importlib.import_module(module.name)
                # by name (a module may import another first): listings and messages do not follow imports
                self._entries = dict(sorted(self._entries.items()))
                for point in sorted(entry_points(group=self.group), key=lambda p: p.name):
                    self._load_plugin(point)
            except PluginError as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._entries

    def _load_plugin(self, point: EntryPoint) -> None:
        distribution = point.dist.name if point.dist is not None else "an installed package"
        self._plugin = f"{distribution} (entry point {self.group}: {point.name} = {point.value})"
        before = set(self._entries)
        try:
            point.load()
        except PluginError:
            raise
        except Exception as exc:  # any failure of outside code is one message, never a traceback
            raise PluginError(f"{self.kind} plugin {self._plugin} failed to load: "
                              f"{type(exc).__name__}: {exc}") from None
        finally:
            self._plugin = None
        if set(self._entries) == before:
            raise PluginError(f"{self.kind} plugin {distribution} (entry point {self.group}: {point.name} = "
                              f"{point.value}) registered nothing: decorate its class with "
                              f"@{self.decorator}(name, ConfigClass)")

    def names(self) -> list[str]:
        return list(self.load())

    def get(self, name: str) -> Entry:
        entries = self.load()
        if name not in entries:
            raise PluginError(f"unknown {self.kind} {name!r}; expected one of {sorted(entries)}")
        return entries[name]

    def config_union(self) -> Any:
        """The registered config classes as one pydantic type, discriminated by `tag`."""
        classes = tuple(entry.config_class for entry in self.load().values())
        return Annotated[Union[classes], Field(discriminator=self.tag)]  # noqa: UP007 (a runtime tuple)


class RegisteredConfig:
    """Annotated metadata: a field whose type is `registry.config_union()`, resolved when the schema is
    first built (models of the config set `defer_build`), so the union holds outside parts too."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        return handler.generate_schema(self.registry.config_union())


METHODS = Registry("flatness method", package="cl_flat.flatness", group="cl_flat.flatness", tag="method",
                   decorator="cl_flat.flatness.register")
STRATEGIES = Registry("CL strategy", package="cl_flat.strategies", group="cl_flat.strategies", tag="strategy",
                      decorator="cl_flat.strategies.register")
