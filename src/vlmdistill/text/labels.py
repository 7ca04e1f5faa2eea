"""Label spaces: class folder names, natural names and optional one-sentence descriptions.

Reads the paper's formats exactly: ``label2text.txt`` (``<class_dir> <1-based id> <name_with_underscores>``)
and ``chatgpt.txt`` (line i describes line i of label2text), or a JSON ``{class: description}`` file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from vlmdistill.errors import VlmdistillError


class LabelFileError(VlmdistillError, ValueError):
    """A label or description file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ClassInfo:
    dir: str
    id: int
    name: str
    description: str | None = None


def _read_text(path: Path) -> str:
    """The file as UTF-8; another encoding is an error naming the line, not a traceback."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise LabelFileError(
            f"{path}:{line}: byte {data[err.start:err.start + 1]!r} is not UTF-8; save the file as UTF-8"
        ) from err


def _lines(path: Path) -> list[str]:
    """Lines without their newline; trailing blank lines (a final newline) do not count."""
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_label_file(path: Path) -> list[ClassInfo]:
    """Parse ``label2text.txt``; underscores in the name field become spaces."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"label file {path} does not exist")
    classes: list[ClassInfo] = []
    seen: set[str] = set()
    for n, line in enumerate(_lines(path), start=1):
        fields = line.strip().split(" ")
        if len(fields) != 3 or not (fields[1].isascii() and fields[1].isdigit()):
            raise LabelFileError(
                f"{path}:{n}: expected '<class_dir> <1-based id> <name_with_underscores>', got {line!r}"
            )
        if fields[0] in seen:
            raise LabelFileError(f"{path}:{n}: class folder {fields[0]!r} is listed twice")
        seen.add(fields[0])
        classes.append(ClassInfo(dir=fields[0], id=int(fields[1]), name=fields[2].replace("_", " ")))
    if not classes:
        raise LabelFileError(f"label file {path} lists no classes")
    return classes


def _is_label_line(line: str) -> bool:
    fields = line.strip().split(" ")
    return len(fields) == 3 and fields[1].isascii() and fields[1].isdigit()


def read_class_list(path: Path) -> list[ClassInfo]:
    """A ``label2text.txt`` (every line ``<dir> <id> <name>``), else a plain file of one class name a line."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"class file {path} does not exist: give a label2text.txt or one class name a line")
    lines = [ln.strip() for ln in _lines(path) if ln.strip()]
    if not lines:
        raise LabelFileError(f"class file {path} lists no classes: give one name a line")
    if all(map(_is_label_line, lines)):
        return read_label_file(path)
    return [ClassInfo(dir=name, id=i + 1, name=name) for i, name in enumerate(lines)]


def read_descriptions(path: Path, classes: list[ClassInfo], label_path: Path | None = None) -> list[ClassInfo]:
    """Attach descriptions from a line-aligned text file or a JSON mapping keyed by folder or name."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"description file {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise LabelFileError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(mapping, dict):
            raise LabelFileError(f"{path} must hold a JSON object {{class: description}}")
        missing = [c.dir for c in classes if c.dir not in mapping and c.name not in mapping]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise LabelFileError(
                f"{path} has no description for {len(missing)} classes ({shown}); "
                "add them, e.g. with `vlmdistill describe`"
            )
        return [replace(c, description=str(mapping.get(c.dir, mapping.get(c.name))).strip()) for c in classes]
    lines = _lines(path)
    if len(lines) != len(classes):
        where = label_path or "the label file"
        raise LabelFileError(
            f"description file {path} has {len(lines)} lines but {where} has {len(classes)} classes; "
            "line i of the description file must describe line i of the label file"
        )
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise LabelFileError(f"description file {path} has empty lines at {empty[:5]}: every class needs one")
    return [replace(c, description=line.strip()) for c, line in zip(classes, lines, strict=True)]


def classes_from_folders(dirs: list[str]) -> list[ClassInfo]:
    """Plain folder names when no label file exists: underscores become spaces."""
    return [ClassInfo(dir=d, id=i + 1, name=d.replace("_", " ")) for i, d in enumerate(sorted(dirs))]


def format_label_file(classes: list[ClassInfo]) -> str:
    """The paper's label2text format (names keep their words, joined by underscores)."""
    return "".join(f"{c.dir} {c.id} {c.name.replace(' ', '_')}\n" for c in classes)


@dataclass(frozen=True)
class LabelSpace:
    """The ordered classes one split is scored over; index i is label i."""

    classes: tuple[ClassInfo, ...]
    # Where descriptions would come from, for messages only (open_dataset sets the dataset's own file).
    descriptions_file: str = field(default="<data.dir>/chatgpt.txt", compare=False)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def dirs(self) -> list[str]:
        return [c.dir for c in self.classes]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def index(self) -> dict[str, int]:
        return {c.dir: i for i, c in enumerate(self.classes)}

    def __add__(self, other: LabelSpace) -> LabelSpace:
        return LabelSpace(self.classes + other.classes, self.descriptions_file)

    def prompts(self, template: str, description_template: str, use_descriptions: bool) -> list[str]:
        """The paper's prompts: ``a photo of {name}`` or ``a photo of {name} . {description}``."""
        if not use_descriptions:
            return [template.format(name=c.name) for c in self.classes]
        missing = [c.dir for c in self.classes if not c.description]
        if missing:
            raise LabelFileError(
                f"text.use_descriptions is on but {len(missing)} classes have no description "
                f"({', '.join(missing[:5])}); give {self.descriptions_file} or text.descriptions"
            )
        return [description_template.format(name=c.name, description=c.description) for c in self.classes]
