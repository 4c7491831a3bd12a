"""HTTP's part of a remote folder: ranged reads that never read past the range, bodies never inflated, and
redirects kept on the same origin (scheme, host and port) unless `data.redirects: any`."""

from __future__ import annotations

from typing import Any

from shards.errors import without_credentials
from shards.store.failures import StoreMisbehaved


async def http_range(fs, url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) over HTTP, read from the stream no further than asked: a server that sends more
    (ignoring the range, or lying in it) costs no more memory than the range. A server without range
    requests (200) serves a file from its start only."""
    session = await fs.set_session()
    options = {key: value for key, value in fs.kwargs.items() if key != "headers"}
    headers = {**fs.kwargs.get("headers", {}), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    async with session.get(fs.encode_url(url), headers=headers, **options) as response:
        if response.status == 416:  # the range starts at or past the end
            return b""
        response.raise_for_status()
        if response.status == 200 and start > 0:
            raise StoreMisbehaved(f"{url}: the server ignores range requests (HTTP 200 for a range)")
        if response.status not in (200, 206):
            raise StoreMisbehaved(f"{url}: HTTP {response.status} for a range request")
        wanted = end - start
        body = bytearray()
        while len(body) < wanted and (piece := await response.content.read(wanted - len(body))):
            body += piece
        if response.status == 206 and await response.content.read(1):
            raise StoreMisbehaved(f"{url}: answered more bytes than the range of {wanted} asked")
        return bytes(body)


def http_options(storage_options: dict[str, Any], redirects: str) -> dict[str, Any]:
    """fsspec HTTP options with ours under the user's: aiohttp's session never inflates a body (a gzip
    bomb), every request asks for the bytes as stored, and redirects stay on the same origin unless
    `redirects` is "any"."""
    client = dict(storage_options.get("client_kwargs") or {})
    client.setdefault("auto_decompress", False)
    if redirects != "any":
        client["trace_configs"] = [*client.get("trace_configs", ()), same_origin_redirects()]
    headers = {"Accept-Encoding": "identity", **(storage_options.get("headers") or {})}
    return {**storage_options, "client_kwargs": client, "headers": headers}


_same_origin_trace = None


def same_origin_redirects():
    """An aiohttp trace that refuses a redirect to another origin (one object: fsspec's instance cache
    keys file systems by their options)."""
    global _same_origin_trace
    if _same_origin_trace is None:
        import aiohttp

        async def check(session, context, params) -> None:
            headers = params.response.headers  # aiohttp follows Location, else URI
            target = params.response.url.join(aiohttp.client.URL(headers.get("Location") or headers.get("URI") or ""))
            if origin(target) != origin(params.url):
                raise StoreMisbehaved(
                    without_credentials(
                        f"{params.url}: redirected to another origin ({target}); data.redirects: any follows it"
                    )
                )

        _same_origin_trace = aiohttp.TraceConfig()
        _same_origin_trace.on_request_redirect.append(check)
    return _same_origin_trace


def origin(url) -> tuple[str, str, int | None]:
    return (url.scheme, url.host or "", url.port)
