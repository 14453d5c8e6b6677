"""The Twitter-format reader: real-file quirks accepted, bad input refused with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from msvse.cli import data_cli
from msvse.errors import DataFormatError
from msvse.twitter import Post, entities, format_posts, parse_posts, read_posts, stats

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

GOOD = "IMGID:1015799\nRT\tO\nGeorge\tB-PER\nZimmerman\tI-PER\n\nIMGID:17_06_1\nParis\tB-OTHER\n\n"


def write(tmp_path: Path, data: bytes | str, name: str = "posts.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_reads_posts_and_maps_other_to_misc(tmp_path):
    posts = read_posts(write(tmp_path, GOOD))
    assert [p.image_id for p in posts] == ["1015799", "17_06_1"]
    assert posts[0].tokens == ("RT", "George", "Zimmerman")
    assert posts[0].tags == ("O", "B-PER", "I-PER")
    assert posts[1].tags == ("B-MISC",)
    assert posts[0].line == 1 and posts[1].line == 6
    assert posts[0].image_file == "1015799.jpg"


@pytest.mark.parametrize(
    "variant",
    [
        GOOD.replace("\n", "\r\n"),  # CRLF
        "\ufeff" + GOOD,  # byte-order mark
        GOOD.rstrip("\n"),  # no final blank line
        GOOD.replace("\tO\n", "\tO  \n").replace("\n\n", "\n \t\n"),  # trailing whitespace, blank line with spaces
    ],
    ids=["crlf", "bom", "no-final-blank", "trailing-whitespace"],
)
def test_real_file_quirks_read_the_same(tmp_path, variant):
    def view(posts):
        return [(p.image_id, p.tokens, p.tags, p.line) for p in posts]

    assert view(read_posts(write(tmp_path, variant))) == view(read_posts(write(tmp_path, GOOD, "clean.txt")))


def test_no_break_space_token_is_a_token(tmp_path):
    posts = read_posts(write(tmp_path, "IMGID:1\n:\tO\n\u00a0\tO\nx\tO\n"))
    assert posts[0].tokens == (":", "\u00a0", "x")


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("IMGID:1\nGeorge\tB-PERSON\n", 2, "unknown tag 'B-PERSON'"),
        ("IMGID:1\nGeorge\tE-PER\n", 2, "unknown tag 'E-PER'"),
        ("IMGID:1\nRT\tO\nGeorge B-PER\n", 3, "no tab"),
        ("RT\tO\n", 1, "must start with an 'IMGID:' line"),
        ("IMGID:1\nRT\tO\n\nRT\tO\n", 4, "must start with an 'IMGID:' line"),
        ("IMGID:../etc/passwd\nRT\tO\n", 1, "path separator"),
        ("IMGID:..\nRT\tO\n", 1, "'..'"),
        ("IMGID:a\\b\nRT\tO\n", 1, "path separator"),
        ("IMGID:\nRT\tO\n", 1, "empty image id"),
        ("IMGID:1\n\tO\n", 2, "empty token"),
    ],
    ids=["unknown-type", "unknown-prefix", "no-tab", "no-imgid", "no-imgid-after-blank", "escape", "dotdot", "backslash", "empty-id", "empty-token"],
)
def test_bad_input_names_file_and_line(tmp_path, text, line, needle):
    path = write(tmp_path, text)
    with pytest.raises(DataFormatError) as info:
        read_posts(path)
    assert info.value.path == str(path)
    assert info.value.line == line
    assert needle in str(info.value)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path, b"IMGID:1\nRT\tO\ncaf\xe9\tO\n")
    with pytest.raises(DataFormatError, match=r":3: not UTF-8"):
        read_posts(path)


def test_empty_file_and_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="no posts found"):
        read_posts(write(tmp_path, "\n\n"))
    with pytest.raises(DataFormatError, match="file not found"):
        read_posts(tmp_path / "absent.txt")


def test_unlabelled_reading_tags_o(tmp_path):
    posts = read_posts(write(tmp_path, "IMGID:1\nhello\nworld\n"), labelled=False)
    assert posts[0].tags == ("O", "O")


def test_round_trip_through_format(tmp_path):
    posts = read_posts(write(tmp_path, GOOD))
    again = parse_posts(format_posts(posts), "again")
    assert [(p.image_id, p.tokens, p.tags) for p in again] == [(p.image_id, p.tokens, p.tags) for p in posts]
    new_tags = [["O", "O", "B-LOC"], ["O"]]
    relabelled = parse_posts(format_posts(posts, new_tags), "x")
    assert [list(p.tags) for p in relabelled] == new_tags
    with pytest.raises(ValueError, match="3 tokens but 2 tags"):
        format_posts(posts, [["O", "O"], ["O"]])


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["B-PER", "I-PER", "O"], [("PER", 0, 2)]),
        (["I-PER", "I-PER"], [("PER", 0, 2)]),  # orphan I- starts an entity
        (["B-PER", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),  # type change splits
        (["B-PER", "B-PER"], [("PER", 0, 1), ("PER", 1, 2)]),
        (["O", "I-ORG", "O", "I-ORG"], [("ORG", 1, 2), ("ORG", 3, 4)]),
        ([], []),
    ],
)
def test_entities_conlleval_counting(tags, expected):
    assert [(e.type, e.start, e.end) for e in entities(tags)] == expected


def test_entities_agree_with_seqeval():
    from seqeval.metrics.sequence_labeling import get_entities

    rows = [["I-PER", "I-PER", "B-LOC", "I-ORG", "O", "I-MISC"], ["B-ORG", "I-ORG", "I-ORG", "B-ORG"]]
    for tags in rows:
        ours = sorted((e.type, e.start, e.end - 1) for e in entities(tags))
        assert ours == sorted(get_entities(tags))


def test_stats_counts():
    posts = [Post("1", ("a", "b", "c"), ("B-PER", "I-PER", "I-LOC")), Post("2", (), ())]
    assert stats(posts) == {"posts": 2, "tokens": 3, "PER": 1, "LOC": 1, "ORG": 0, "MISC": 0, "entities": 2}


EXPECTED_TABLE = {
    "twitter2015/train.txt": (4000, 64439, 2285, 2135, 957, 975, 6352),
    "twitter2015/valid.txt": (1000, 16178, 567, 543, 251, 233, 1594),
    "twitter2015/test.txt": (3257, 52822, 1873, 1720, 860, 754, 5207),
    "twitter2017/train.txt": (3373, 53007, 2943, 731, 1674, 701, 6049),
    "twitter2017/valid.txt": (723, 11309, 626, 173, 375, 150, 1324),
    "twitter2017/test.txt": (723, 11330, 621, 178, 395, 157, 1351),
}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the real Twitter-2015/2017 text files are not beside this checkout (../shared/data)")
def test_stats_cli_reproduces_the_published_table():
    files = [str(SHARED_DATA / name) for name in EXPECTED_TABLE]
    result = CliRunner().invoke(data_cli, ["stats", "--json", *files])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    for name, expected in EXPECTED_TABLE.items():
        row = rows[str(SHARED_DATA / name)]
        got = tuple(row[k] for k in ("posts", "tokens", "PER", "LOC", "ORG", "MISC", "entities"))
        assert got == expected, name
    assert rows[str(SHARED_DATA / "twitter2015/test.txt")]["entities"] == 5207


def test_stats_cli_bad_file_is_one_line_error(tmp_path):
    path = write(tmp_path, "IMGID:1\nx\tB-FOO\n")
    result = CliRunner().invoke(data_cli, ["stats", str(path)])
    assert result.exit_code == 2
    assert f"{path}:2: unknown tag 'B-FOO'" in result.output
    assert "Traceback" not in result.output


def test_stats_cli_table(tmp_path):
    path = write(tmp_path, GOOD)
    result = CliRunner().invoke(data_cli, ["stats", str(path)])
    assert result.exit_code == 0
    header, row = result.output.strip().splitlines()
    assert header.split() == ["file", "posts", "tokens", "PER", "LOC", "ORG", "MISC", "entities"]
    assert row.split()[1:] == ["2", "4", "1", "0", "0", "1", "2"]
