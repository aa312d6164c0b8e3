"""The import statements of a source file, read with ``ast`` (module-level and inside functions alike)."""
import ast
from pathlib import Path


def import_statements(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """[(module, names imported from it)]: ``import a.b`` gives ("a.b", []); relative modules are resolved
    against ``package``, the package the file's relative imports start from."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
    return out
