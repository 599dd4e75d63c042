"""Image files the tests write themselves, byte by byte where Pillow cannot (16-bit RGB, bombs)."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: bytes, bit_depth: int = 8, colour_type: int = 2) -> bytes:
  """A PNG of `rows` (each row: filter byte + raw samples), compressed in one go."""
  header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, 9))
          + _chunk(b"IEND", b""))


def png_bomb(width: int = 20_000, height: int = 20_000, block_rows: int = 200) -> bytes:
  """A valid RGB PNG of white pixels: 20,000 x 20,000 (1.2 GB decoded) in ~1.2 MB.

  Deflating 1.2 GB takes ~20 s, so one block of rows is compressed, ended with a full
  flush (the next block then needs no history) and repeated; the Adler-32 covers the
  whole decoded stream, so a decoder that got that far would accept the file.
  """
  assert height % block_rows == 0
  rows = (b"\x00" + b"\xff" * (3 * width)) * block_rows
  deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = deflate.compress(rows) + deflate.flush(zlib.Z_FULL_FLUSH)
  end = deflate.flush(zlib.Z_FINISH)
  adler = 1
  for _ in range(height // block_rows):
    adler = zlib.adler32(rows, adler)
  stream = b"\x78\xda" + block * (height // block_rows) + end + struct.pack(">I", adler)
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
