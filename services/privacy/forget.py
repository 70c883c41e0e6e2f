"""Deleting one user's rows from ClickHouse (`rlfeed forget USER_ID`), over any client.

Which tables: every MergeTree table of the database with a `user_id` column (found in
`system.columns`, so a table added later is covered), except `forget_requests`, the
audit trail. Rows linked to the user only through their generations (feedback sent
under another user id, samples, preferences) go first, while the generations still name
them; then every row with the user's id; then dead letters whose original bytes carry
`"user_id":"<id>"` (dead_letters has no user_id column). Rollups (`*_1m`) hold
aggregates without user ids and are left alone.

Deletes are ClickHouse lightweight `DELETE FROM` (rows vanish from reads at once and are
removed on the next merge); they work the same on chdb and on a server.
"""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

KEEP_TABLES = frozenset({"forget_requests"})
"""Tables with a user_id column that forget leaves alone (the audit trail)."""

_PARAMS = "{tenant:String}", "{user:String}"


def user_tables(client: Client) -> dict[str, set[str]]:
    """Table -> its columns, for every MergeTree table of the current database with a user_id column."""
    rows = client.query(
        """SELECT c.table, groupArray(c.name) FROM system.columns AS c
INNER JOIN system.tables AS t ON t.database = c.database AND t.name = c.table
WHERE c.database = currentDatabase() AND t.engine LIKE '%MergeTree%'
GROUP BY c.table HAVING has(groupArray(c.name), 'user_id')"""
    ).result_rows
    return {table: set(cols) for table, cols in rows if table not in KEEP_TABLES}


def delete_statements(tables: dict[str, set[str]], has_dead_letters: bool) -> list[tuple[str, str]]:
    """(table, WHERE clause) in the order they must run, with `{tenant:String}` and
    `{user:String}` (and `{needle*:String}` for dead letters) as query parameters."""
    tenant, user = _PARAMS
    mine = f"tenant_id = {tenant} AND user_id = {user}"
    out: list[tuple[str, str]] = []
    if "generations" in tables:
        linked = f"SELECT generation_id FROM generations WHERE {mine}"
        for table in sorted(tables):
            if table != "generations" and "generation_id" in tables[table]:
                out.append((table, f"tenant_id = {tenant} AND generation_id IN ({linked})"))
    for table in sorted(tables):
        if table != "generations":
            out.append((table, mine))
    if "generations" in tables:
        out.append(("generations", mine))
    if has_dead_letters:
        decoded = "tryBase64Decode(original_b64)"
        out.append(
            (
                "dead_letters",
                f"(position({decoded}, {{needle:String}}) > 0 OR position({decoded}, {{needle_spaced:String}}) > 0)"
                f" AND (tenant_id = {tenant} OR position({decoded}, {{tenant_needle:String}}) > 0"
                f" OR position({decoded}, {{tenant_needle_spaced:String}}) > 0)",
            )
        )
    return out


def parameters(tenant_id: str, user_id: str) -> dict[str, str]:
    """The query parameters of `delete_statements` for one user."""
    return {
        "tenant": tenant_id,
        "user": user_id,
        "needle": f'"user_id":"{user_id}"',
        "needle_spaced": f'"user_id": "{user_id}"',
        "tenant_needle": f'"tenant_id":"{tenant_id}"',
        "tenant_needle_spaced": f'"tenant_id": "{tenant_id}"',
    }


def delete_user(client: Client, tenant_id: str, user_id: str) -> dict[str, int]:
    """Delete the user's rows; return the rows each table held for them (before the delete)."""
    tables = user_tables(client)
    has_dead_letters = bool(
        client.query(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'dead_letters'"
        ).result_rows[0][0]
    )
    params = parameters(tenant_id, user_id)
    counts: dict[str, int] = {}
    for table, where in delete_statements(tables, has_dead_letters):
        n = int(client.query(f"SELECT count() FROM {table} WHERE {where}", parameters=params).result_rows[0][0])
        if n:
            client.command(f"DELETE FROM {table} WHERE {where}", parameters=params)
        counts[table] = counts.get(table, 0) + n
    return counts
