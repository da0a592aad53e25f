"""Column batches: rows of a collection as one array or list per field (what read-out yields
and the write paths send), and their conversions to and from pymilvus's row dicts."""
from __future__ import annotations

import numpy as np

Columns = dict   # field name -> np.ndarray (numbers, [n, dim] float vectors) or list (other values)
DYNAMIC_COLUMN = "$dynamic"   # column of dicts: each row's dynamic-field keys (read with "*")


def n_rows_of(columns: Columns) -> int:
    """Number of rows in a column batch (0 for no columns)."""
    return len(next(iter(columns.values()))) if columns else 0


def take_rows(columns: Columns, index) -> Columns:
    """The rows ``index`` (integer array or slice) of every column."""
    out = {}
    for name, col in columns.items():
        if isinstance(col, np.ndarray):
            out[name] = col[index]
        elif isinstance(index, slice):
            out[name] = col[index]
        else:
            out[name] = [col[i] for i in index]
    return out


def concat_columns(parts: list[Columns]) -> Columns:
    """One column batch holding the rows of ``parts`` in order."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in parts[0]:
        cols = [p[name] for p in parts]
        out[name] = np.concatenate(cols) if isinstance(cols[0], np.ndarray) else \
            [v for c in cols for v in c]
    return out


def columns_to_rows(columns: Columns) -> list[dict]:
    """Row dicts for ``MilvusClient.insert`` (vectors stay numpy rows: no per-float Python lists)."""
    names = [n for n in columns if n != DYNAMIC_COLUMN]
    cols = []
    for name in names:
        col = columns[name]
        cols.append(col.tolist() if isinstance(col, np.ndarray) and col.ndim == 1 else col)
    rows = [dict(zip(names, values)) for values in zip(*cols)]
    for row, extra in zip(rows, columns.get(DYNAMIC_COLUMN) or ()):
        row.update(extra)
    return rows


def rows_to_columns(rows: list[dict], fields: list[str], vector_fields=(),
                    dynamic: bool = False) -> Columns:
    """Row dicts as columns: ``vector_fields`` as float32 [n, dim], int-only fields as int64;
    with ``dynamic``, every other key goes to :data:`DYNAMIC_COLUMN`."""
    out: Columns = {}
    if dynamic:
        known = set(fields)
        out[DYNAMIC_COLUMN] = [{k: v for k, v in r.items() if k not in known} for r in rows]
    for name in fields:
        values = [r.get(name) for r in rows]
        if name in vector_fields:
            out[name] = np.asarray(values, dtype=np.float32)
        elif values and all(type(v) is int for v in values):
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            out[name] = values
    return out


def rows_to_arrays(batch: list[dict], primary: str, vector: str) -> tuple[np.ndarray, np.ndarray]:
    """Primary keys and float32 vectors of a batch of row dicts."""
    ids = np.array([r[primary] for r in batch])
    vecs = np.asarray([r[vector] for r in batch], dtype=np.float32)
    return ids, vecs
