"""The platform's state: SQLite (WAL) at ``<data-dir>/platform.sqlite3`` and a file store.

Every write commits at once, so a platform killed mid-round restarts with its open rounds
and their uploads intact. One connection, used only from the event-loop thread: each
statement is short; the heavy work (hashing, validating, aggregating) happens elsewhere on
file paths.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bk_sim.errors import PlatformError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trees (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, owner_id TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS branches (
    id TEXT PRIMARY KEY, tree_id TEXT NOT NULL REFERENCES trees(id) ON DELETE CASCADE,
    name TEXT NOT NULL, strategy TEXT NOT NULL, quorum INTEGER, round_timeout_s REAL,
    trim_fraction REAL NOT NULL, model_config TEXT NOT NULL,
    run_status TEXT NOT NULL, run_number INTEGER NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leaves (
    id TEXT PRIMARY KEY, branch_id TEXT NOT NULL REFERENCES branches(id) ON DELETE CASCADE,
    tree_id TEXT NOT NULL, owner_id TEXT NOT NULL, name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    branch_id TEXT NOT NULL REFERENCES branches(id) ON DELETE CASCADE,
    round INTEGER NOT NULL, run_number INTEGER NOT NULL, status TEXT NOT NULL,
    strategy TEXT NOT NULL, aggregation_id TEXT, opened_at TEXT NOT NULL, closed_at TEXT,
    close_reason TEXT, error TEXT, fault TEXT, signature TEXT NOT NULL,
    timed_out INTEGER NOT NULL DEFAULT 0, closed_by TEXT,
    PRIMARY KEY (branch_id, round)
);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, branch_id TEXT NOT NULL, kind TEXT NOT NULL,
    size INTEGER NOT NULL, digest TEXT, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    file_id TEXT PRIMARY KEY REFERENCES files(id), branch_id TEXT NOT NULL,
    round INTEGER NOT NULL, leaf_id TEXT NOT NULL, digest TEXT NOT NULL,
    weighting REAL NOT NULL, received_at TEXT NOT NULL, size INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 1, seq INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS uploads_round ON uploads (branch_id, round, active);
-- federated analytics (docs/analytics.md): branch field_ops, the schema frozen per run,
-- and per round its must_match reference and its result (fields + derived statistics)
CREATE TABLE IF NOT EXISTS fa_field_ops (
    branch_id TEXT PRIMARY KEY REFERENCES branches(id) ON DELETE CASCADE, ops TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fa_schemas (
    branch_id TEXT NOT NULL REFERENCES branches(id) ON DELETE CASCADE,
    run_number INTEGER NOT NULL, schema TEXT NOT NULL, PRIMARY KEY (branch_id, run_number)
);
CREATE TABLE IF NOT EXISTS fa_rounds (
    branch_id TEXT NOT NULL REFERENCES branches(id) ON DELETE CASCADE,
    round INTEGER NOT NULL, reference TEXT, result TEXT, PRIMARY KEY (branch_id, round)
);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT, branch_id TEXT NOT NULL, leaf_id TEXT NOT NULL,
    mode TEXT NOT NULL, aggregation_id TEXT, data TEXT NOT NULL, received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_leaf ON metrics (leaf_id);
CREATE INDEX IF NOT EXISTS metrics_branch ON metrics (branch_id, id);
"""

_FILE_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value)


def new_id() -> str:
    return str(uuid.uuid4())


def is_file_id(value: str) -> bool:
    """A file id the store could have issued (a lowercase UUID): nothing path-like."""
    return bool(_FILE_ID_RE.fullmatch(value))  # fullmatch: "$" also matches before a "\n"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Leaf:
    id: str
    branch_id: str
    tree_id: str
    owner_id: str
    name: str
    token_sha256: str

    def token_matches(self, token: str) -> bool:
        return hmac.compare_digest(self.token_sha256, token_hash(token))


BRANCH_CONFIG_KEYS = ("strategy", "quorum", "round_timeout_s", "trim_fraction", "model_config")


class Store:
    """Rows in SQLite, bytes under ``files/``; methods return plain dicts."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        try:
            self.files_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.data_dir / "platform.sqlite3", isolation_level=None, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(rounds)")}
            if "closed_by" not in columns:  # a store written before the column existed
                self._db.execute("ALTER TABLE rounds ADD COLUMN closed_by TEXT")
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(uploads)")}
            if "acked" not in columns:
                self._db.execute("ALTER TABLE uploads ADD COLUMN acked INTEGER NOT NULL DEFAULT 1")
        except (OSError, sqlite3.Error) as exc:
            raise PlatformError(
                f"cannot open the platform store in {self.data_dir}: {exc}"
            ) from exc

        self._usage: dict[str, tuple[int, int]] = {}  # leaf -> metrics rows, bytes

    def close(self) -> None:
        self._db.close()

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = self._db.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    # -- meta
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", key)
        return row["value"] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def owner_id(self) -> str:
        owner = self.meta("owner_id")
        if owner is None:
            owner = new_id()
            self.set_meta("owner_id", owner)
        return owner

    @property
    def incoming_dir(self) -> Path:
        """Uploads being received (same file system as ``files/``: moved in by rename)."""
        return self.files_dir / "incoming"

    def clear_incoming(self) -> None:
        """Remove partial uploads a previous process left behind."""
        if self.incoming_dir.is_dir():
            for part in self.incoming_dir.glob("*.part"):
                part.unlink(missing_ok=True)

    def file_path(self, file_id: str) -> Path:
        if not is_file_id(file_id):
            raise PlatformError(f"unsafe file id {file_id!r}")
        return self.files_dir / f"{file_id}.npz"

    # -- trees, branches, leaves
    def create_tree(self, name: str) -> dict[str, Any]:
        tree = {"id": new_id(), "name": name, "owner_id": self.owner_id(), "created_at": now_iso()}
        self._db.execute(
            "INSERT INTO trees (id, name, owner_id, created_at) VALUES (?, ?, ?, ?)",
            (tree["id"], name, tree["owner_id"], tree["created_at"]),
        )
        return tree

    def tree(self, tree_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM trees WHERE id = ?", tree_id)

    def branch_ids(self, tree_id: str) -> list[str]:
        return [r["id"] for r in self._all("SELECT id FROM branches WHERE tree_id = ?", tree_id)]

    def delete_tree(self, tree_id: str) -> tuple[list[str], list[str]]:
        """Remove a tree with its branches, leaves, rounds and file rows.

        Returns the removed leaf ids (to delete their broker users) and file ids (to
        delete their bytes).
        """
        leaves = [r["id"] for r in self._all("SELECT id FROM leaves WHERE tree_id = ?", tree_id)]
        in_tree = "branch_id IN (SELECT id FROM branches WHERE tree_id = ?)"
        files = [r["id"] for r in self._all(f"SELECT id FROM files WHERE {in_tree}", tree_id)]
        for leaf in leaves:
            self._usage.pop(leaf, None)
        with self._db:
            self._db.execute("BEGIN")
            for table in ("uploads", "files", "metrics"):
                self._db.execute(f"DELETE FROM {table} WHERE {in_tree}", (tree_id,))
            self._db.execute("DELETE FROM trees WHERE id = ?", (tree_id,))
        return leaves, files

    def create_branch(self, tree_id: str, name: str, config: dict[str, Any]) -> dict[str, Any]:
        ts = now_iso()
        branch_id = new_id()
        self._db.execute(
            "INSERT INTO branches (id, tree_id, name, strategy, quorum, round_timeout_s, "
            "trim_fraction, model_config, run_status, run_number, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'stop', 0, ?, ?)",
            (
                branch_id,
                tree_id,
                name,
                config["strategy"],
                config["quorum"],
                config["round_timeout_s"],
                config["trim_fraction"],
                json.dumps(config["model_config"]),
                ts,
                ts,
            ),
        )
        self.set_field_ops(branch_id, config.get("field_ops") or {})  # FA
        branch = self.branch(branch_id)
        assert branch is not None
        return branch

    def branch(self, branch_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM branches WHERE id = ?", branch_id)
        if row is not None:
            row["model_config"] = json.loads(row["model_config"])
            row["field_ops"] = self.field_ops(branch_id)  # FA
        return row

    def update_branch(self, branch_id: str, **fields: Any) -> dict[str, Any]:
        if "field_ops" in fields:  # FA: its own table
            self.set_field_ops(branch_id, fields.pop("field_ops") or {})
        if "model_config" in fields:
            fields["model_config"] = json.dumps(fields["model_config"])
        fields["updated_at"] = now_iso()
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(f"UPDATE branches SET {cols} WHERE id = ?", (*fields.values(), branch_id))
        branch = self.branch(branch_id)
        assert branch is not None
        return branch

    def add_leaf(self, branch: dict[str, Any], leaf_id: str, name: str, token: str) -> Leaf:
        leaf = Leaf(
            id=leaf_id,
            branch_id=branch["id"],
            tree_id=branch["tree_id"],
            owner_id=self.owner_id(),
            name=name,
            token_sha256=token_hash(token),
        )
        self._db.execute(
            "INSERT INTO leaves (id, branch_id, tree_id, owner_id, name, token_sha256, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                leaf.id,
                leaf.branch_id,
                leaf.tree_id,
                leaf.owner_id,
                name,
                leaf.token_sha256,
                now_iso(),
            ),
        )
        return leaf

    def leaves(self, branch_id: str | None = None) -> list[Leaf]:
        sql = "SELECT id, branch_id, tree_id, owner_id, name, token_sha256 FROM leaves"
        rows = (
            self._all(sql + " WHERE branch_id = ? ORDER BY created_at, rowid", branch_id)
            if branch_id is not None
            else self._all(sql)
        )
        return [Leaf(**r) for r in rows]

    def leaf_count(self, branch_id: str) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM leaves WHERE branch_id = ?", branch_id)
        return int(row["n"]) if row else 0

    # -- files
    def add_file(
        self, file_id: str, branch_id: str, kind: str, size: int, digest: str | None
    ) -> None:
        self._db.execute(
            "INSERT INTO files (id, branch_id, kind, size, digest, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (file_id, branch_id, kind, size, digest, now_iso()),
        )

    def file(self, file_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM files WHERE id = ?", file_id)

    # -- rounds
    def latest_round(self, branch_id: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM rounds WHERE branch_id = ? ORDER BY round DESC LIMIT 1", branch_id
        )

    def open_round(self, branch: dict[str, Any], signature: list[Any]) -> dict[str, Any]:
        latest = self.latest_round(branch["id"])
        number = 1 if latest is None else latest["round"] + 1
        self._db.execute(
            "INSERT INTO rounds (branch_id, round, run_number, status, strategy, opened_at, "
            "signature) VALUES (?, ?, ?, 'open', ?, ?, ?)",
            (
                branch["id"],
                number,
                branch["run_number"],
                branch["strategy"],
                now_iso(),
                json.dumps(signature),
            ),
        )
        row = self.round_row(branch["id"], number)
        assert row is not None
        return row

    def round_row(self, branch_id: str, number: int) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM rounds WHERE branch_id = ? AND round = ?", branch_id, number
        )

    def update_round(self, branch_id: str, number: int, **fields: Any) -> None:
        if "fault" in fields:
            fields["fault"] = json.dumps(fields["fault"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(
            f"UPDATE rounds SET {cols} WHERE branch_id = ? AND round = ?",
            (*fields.values(), branch_id, number),
        )

    def rounds_to_resume(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM rounds WHERE status = 'open' ORDER BY branch_id, round")

    def previous_aggregate(self, branch_id: str, before: int) -> str | None:
        row = self._one(
            "SELECT aggregation_id FROM rounds WHERE branch_id = ? AND round < ? "
            "AND status = 'aggregated' ORDER BY round DESC LIMIT 1",
            branch_id,
            before,
        )
        return row["aggregation_id"] if row else None

    def round_record(self, branch_id: str, number: int) -> dict[str, Any] | None:
        row = self.round_row(branch_id, number)
        if row is None:
            return None
        uploads = self.active_uploads(branch_id, number)
        fault = (
            json.loads(row["fault"])
            if row["fault"]
            else {"aggregation": None, "victim_leaf_id": None}
        )
        return {
            "round": row["round"],
            "run_number": row["run_number"],
            "status": row["status"],
            "strategy": row["strategy"],
            "aggregation_id": row["aggregation_id"],
            "opened_at": row["opened_at"],
            "closed_at": row["closed_at"],
            "close_reason": row["close_reason"],
            "closed_by": row["closed_by"],
            "error": row["error"],
            "uploads": [
                {
                    "leaf_id": u["leaf_id"],
                    "file_id": u["file_id"],
                    "digest": u["digest"],
                    "weighting": u["weighting"],
                    "received_at": u["received_at"],
                    "size": u["size"],
                }
                for u in uploads
            ],
            "fault": fault,
            **self._fa_record(row),
        }

    def round_numbers(self, branch_id: str, *, after: int = 0, limit: int = -1) -> list[int]:
        """Round numbers above ``after``, ascending, at most ``limit`` (-1: all)."""
        rows = self._all(
            "SELECT round FROM rounds WHERE branch_id = ? AND round > ? ORDER BY round LIMIT ?",
            branch_id,
            after,
            limit,
        )
        return [r["round"] for r in rows]

    def abandon_open_rounds(self, branch_id: str, reason: str) -> list[tuple[int, list[str]]]:
        """Close the branch's open rounds without aggregating them; returns each round's
        number and upload file ids (no round needs those files any more)."""
        rows = self._all(
            "SELECT round FROM rounds WHERE branch_id = ? AND closed_at IS NULL", branch_id
        )
        out = []
        for r in rows:
            files = self._all(
                "SELECT file_id FROM uploads WHERE branch_id = ? AND round = ?",
                branch_id,
                r["round"],
            )
            self.update_round(
                branch_id,
                r["round"],
                status="abandoned",
                closed_at=now_iso(),
                close_reason=reason,
            )
            out.append((int(r["round"]), [f["file_id"] for f in files]))
        return out

    # -- uploads
    def active_uploads(self, branch_id: str, number: int) -> list[dict[str, Any]]:
        return self._all(
            "SELECT * FROM uploads WHERE branch_id = ? AND round = ? AND active = 1 ORDER BY seq",
            branch_id,
            number,
        )

    def uploader_count(self, branch_id: str, number: int) -> int:
        """How many distinct leaves have an upload in the round."""
        row = self._one(
            "SELECT COUNT(DISTINCT leaf_id) AS n FROM uploads WHERE branch_id = ? AND round = ? "
            "AND active = 1",
            branch_id,
            number,
        )
        return int(row["n"]) if row else 0

    def leaf_uploaded(self, branch_id: str, number: int, leaf_id: str) -> bool:
        row = self._one(
            "SELECT 1 AS x FROM uploads WHERE branch_id = ? AND round = ? AND leaf_id = ? "
            "AND active = 1 LIMIT 1",
            branch_id,
            number,
            leaf_id,
        )
        return row is not None

    def find_upload(
        self, branch_id: str, number: int, leaf_id: str, digest: str
    ) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM uploads WHERE branch_id = ? AND round = ? AND leaf_id = ? "
            "AND digest = ? AND active = 1",
            branch_id,
            number,
            leaf_id,
            digest,
        )

    def add_upload(
        self,
        *,
        file_id: str,
        branch_id: str,
        number: int,
        leaf_id: str,
        digest: str,
        weighting: float,
        size: int,
        replace: bool,
    ) -> list[str]:
        """Record an upload in a round; ``replace`` retires the leaf's earlier ones.

        Returns the file ids it retired: no round needs their bytes any more.
        """
        retired: list[str] = []
        with self._db:
            self._db.execute("BEGIN")
            if replace:
                retired = [
                    r[0]
                    for r in self._db.execute(
                        "SELECT file_id FROM uploads WHERE branch_id = ? AND round = ? "
                        "AND leaf_id = ? AND active = 1",
                        (branch_id, number, leaf_id),
                    ).fetchall()
                ]
                self._db.execute(
                    "UPDATE uploads SET active = 0 WHERE branch_id = ? AND round = ? "
                    "AND leaf_id = ?",
                    (branch_id, number, leaf_id),
                )
            seq_row = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM uploads WHERE branch_id = ? AND round = ?",
                (branch_id, number),
            ).fetchone()
            self._db.execute(
                "INSERT INTO files (id, branch_id, kind, size, digest, created_at) "
                "VALUES (?, ?, 'upload', ?, ?, ?)",
                (file_id, branch_id, size, digest, now_iso()),
            )
            self._db.execute(
                "INSERT INTO uploads (file_id, branch_id, round, leaf_id, digest, weighting, "
                "received_at, size, active, seq, acked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, 0)",
                (
                    file_id,
                    branch_id,
                    number,
                    leaf_id,
                    digest,
                    weighting,
                    now_iso(),
                    size,
                    seq_row[0],
                ),
            )
        return retired

    def only_uploader(self, branch_id: str, number: int, leaf_id: str) -> bool:
        """No other leaf has an active upload in the round."""
        row = self._one(
            "SELECT 1 AS x FROM uploads WHERE branch_id = ? AND round = ? AND leaf_id != ? "
            "AND active = 1 LIMIT 1",
            branch_id,
            number,
            leaf_id,
        )
        return row is None

    def mark_acked(self, file_id: str) -> None:
        """The upload's 201 was written to the leaf: a resend of it is no longer a retry
        once its round has closed (unless it completed the round)."""
        self._db.execute("UPDATE uploads SET acked = 1 WHERE file_id = ?", (file_id,))

    def upload_row(self, file_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM uploads WHERE file_id = ?", file_id)

    # -- federated analytics (FA hook: the fa helper's tables, docs/analytics.md)
    def field_ops(self, branch_id: str) -> dict[str, str]:
        row = self._one("SELECT ops FROM fa_field_ops WHERE branch_id = ?", branch_id)
        return dict(json.loads(row["ops"])) if row else {}

    def set_field_ops(self, branch_id: str, ops: dict[str, str]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO fa_field_ops (branch_id, ops) VALUES (?, ?)",
            (branch_id, json.dumps(ops, sort_keys=True)),
        )

    def fa_schema(self, branch_id: str, run_number: int) -> dict[str, Any] | None:
        row = self._one(
            "SELECT schema FROM fa_schemas WHERE branch_id = ? AND run_number = ?",
            branch_id,
            run_number,
        )
        return dict(json.loads(row["schema"])) if row else None

    def set_fa_schema(self, branch_id: str, run_number: int, schema: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO fa_schemas (branch_id, run_number, schema) VALUES (?, ?, ?)",
            (branch_id, run_number, json.dumps(schema)),
        )

    def fa_round(self, branch_id: str, number: int) -> dict[str, Any]:
        """``{"reference": ..., "result": ...}`` of an FA round (None where not set)."""
        row = self._one(
            "SELECT reference, result FROM fa_rounds WHERE branch_id = ? AND round = ?",
            branch_id,
            number,
        )
        return {
            k: (json.loads(row[k]) if row and row[k] else None) for k in ("reference", "result")
        }

    def set_fa_round(self, branch_id: str, number: int, **fields: Any) -> None:
        """Set ``reference`` and/or ``result`` of an FA round."""
        current = self.fa_round(branch_id, number)
        current.update(fields)
        self._db.execute(
            "INSERT OR REPLACE INTO fa_rounds (branch_id, round, reference, result) "
            "VALUES (?, ?, ?, ?)",
            (
                branch_id,
                number,
                None if current["reference"] is None else json.dumps(current["reference"]),
                None if current["result"] is None else json.dumps(current["result"]),
            ),
        )

    def _fa_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """The round record's ``kind`` and, for an FA round, its ``analytics`` result."""
        signature = json.loads(row["signature"])
        if isinstance(signature, dict) and signature.get("kind") == "federated_analytics":
            result = self.fa_round(row["branch_id"], row["round"])["result"]
            return {"kind": "federated_analytics", "analytics": result}
        return {"kind": "federated_learning"}

    # -- metrics
    def add_metrics(
        self, branch_id: str, leaf_id: str, mode: str, aggregation_id: str | None, data: str
    ) -> int:
        count, used = self.metrics_usage(leaf_id)
        cur = self._db.execute(
            "INSERT INTO metrics (branch_id, leaf_id, mode, aggregation_id, data, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (branch_id, leaf_id, mode, aggregation_id, data, now_iso()),
        )
        self._usage[leaf_id] = (count + 1, used + len(data.encode("utf-8", "surrogatepass")))
        return int(cur.lastrowid or 0)

    def metrics(self, branch_id: str, *, after: int = 0, limit: int = -1) -> list[dict[str, Any]]:
        """Metrics rows with id above ``after``, oldest first, at most ``limit`` (-1: all)."""
        return self._all(
            "SELECT * FROM metrics WHERE branch_id = ? AND id > ? ORDER BY id LIMIT ?",
            branch_id,
            after,
            limit,
        )

    def metrics_usage(self, leaf_id: str) -> tuple[int, int]:
        """How many metrics rows the leaf stored, and their bytes (counted once, then kept)."""
        cached = self._usage.get(leaf_id)
        if cached is not None:
            return cached
        row = self._one(
            "SELECT COUNT(*) AS n, COALESCE(SUM(LENGTH(CAST(data AS BLOB))), 0) AS b "
            "FROM metrics WHERE leaf_id = ?",
            leaf_id,
        )
        usage = (int(row["n"]), int(row["b"])) if row else (0, 0)
        self._usage[leaf_id] = usage
        return usage
