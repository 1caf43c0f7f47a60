"""The `shardify` command: parse arguments, run a stage, print a short summary, set the exit code.

Every failure a user can cause ends in one line on stderr and a documented exit code, never a
traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import orjson

from . import __version__
from .errors import Terminated, UsageError
from .output.store import CONSUMED, REJECTS
from .pathnames import path_text
from .profiles import DatasetProfile
from .profiles.load import BUILT_IN, get_profile, parse_profile_options
from .progress import human_bytes
from .storage import Location, RemotePath, is_url, location, parse_storage_options
from .transform.options import CROPS, DEFAULT_MARGIN, DEFAULT_QUALITY, FORMATS

if TYPE_CHECKING:
    from .convert import ConvertReport
from .plan.split import SPLITS, parse_ratios

EXIT_OK = 0
EXIT_REJECTS = 1
EXIT_USAGE = 2
EXIT_NO_SPACE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, as `yes | head` gives for coreutils

EXIT_CODES = """exit codes:
  0    success (also when some inputs were rejected; see OUT/rejects.parquet)
  1    inputs were rejected and --strict was given, verify found problems,
       or an I/O error stopped the run
  2    usage error, or no input found
  3    not enough disk space for OUT (or export's DIR): checked before
       writing, or the disk filled up
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM: kill, timeout, docker stop, systemd)
  141  stdout was closed before all output was written (e.g. `| head`);
       a convert's output is complete all the same
An interrupted or failed convert keeps its complete shards: re-run the same
command to resume."""

AFTER_INTERRUPT = {
    "convert": "; complete shards are kept: re-run the same command to resume",
    "export": "; DIR is unchanged (the partial export is removed)",
}
MAX_SHARD_SIZE = 2**50
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`1GiB`, `512MiB`, `500MB`, `1e6`-free plain bytes: binary with `i`, decimal without."""
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 512MiB, 500MB)")
    number, prefix, binary = match.groups()
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    size = int(float(number) * (1024 if binary else 1000) ** power)
    if not 0 < size <= MAX_SHARD_SIZE:
        raise argparse.ArgumentTypeError(f"size must be between 1 byte and 1 PiB: {text!r}")
    return size


class SplitOption(NamedTuple):
    text: str
    ratios: tuple[float, float, float]


def parse_split(text: str) -> SplitOption:
    try:
        return SplitOption(text, parse_ratios(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be a whole number from 0 to 2**63-1: "
                                         f"{text!r}")
    return seed


def _whole(text: str) -> int:
    """An argparse type for sizes that may be 0, such as --crop-margin."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0: {text!r}")
    return int(text)


def _quality(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 100: {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    """An argparse type for counts such as --workers."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1: {text!r}")
    return int(text)


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    """`--storage-option KEY=VALUE`, for the commands that take URLs (s3://, gs://, ...)."""
    parser.add_argument("--storage-option", dest="storage_options", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="an fsspec storage option for the URLs given (repeatable; a value "
                        "that parses as JSON is taken as such), e.g. endpoint_url=http://"
                        "127.0.0.1:9000; credentials otherwise come from the environment or "
                        "~/.aws")


def _add_moved_profile(parser: argparse.ArgumentParser) -> None:
    """`--profile FILE.py` for the commands that read an OUT: where a profile file is now."""
    parser.add_argument("--profile", metavar="FILE.py",
                        help="the profile file OUT was converted with, where it is now (only "
                        "when it moved since: the manifest records its path; it must be the "
                        "same profile, name and version)")


def _add_profile(parser: argparse.ArgumentParser) -> None:
    """`--profile NAME|FILE.py` and `-P key=value`: which dataset's rules, with which options."""
    parser.add_argument("--profile", default="battery", metavar="NAME|FILE.py",
                        help="the dataset profile: a built-in one (battery, the default; "
                        "bees-71667; thermal-514: `shardify profiles` lists them) or the path "
                        "of a .py file defining PROFILE (see the README's \"Writing a "
                        "profile\")")
    parser.add_argument("-P", dest="profile_options", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="set one of the profile's options (repeatable), e.g. "
                        "-P group=battery; `shardify profiles` lists each profile's options")


def _profile(args: argparse.Namespace) -> tuple[DatasetProfile, str]:
    """The profile the command line names, and how to name it again later (built-in name or
    absolute file path, as the manifest records it)."""
    try:
        values = parse_profile_options(args.profile_options)
    except ValueError as error:
        raise UsageError(str(error)) from None
    profile = get_profile(args.profile, values)
    if args.profile in BUILT_IN:
        return profile, args.profile
    from .output.manifest import check_columns  # a file's columns, said before any work

    check_columns(profile)
    return profile, str(Path(args.profile).absolute())


def _subcommand(commands: argparse._SubParsersAction, name: str, *, help: str,
                description: str) -> argparse.ArgumentParser:
    """A subcommand; its --help points to `shardify --help` for the exit codes (listed once)."""
    return commands.add_parser(name, help=help, description=description,
                               epilog="exit codes: see shardify --help",
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; --help texts here are the reference the README follows."""
    parser = argparse.ArgumentParser(
        prog="shardify",
        description="Turn zip downloads of image datasets into WebDataset shards split by "
        "battery (or another dataset profile's group) and a Parquet manifest, reading "
        "straight from the zips.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shardify {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="one of these; `shardify COMMAND --help` for its "
                                     "options")

    conv = _subcommand(
        commands, "convert",
        help="convert zips of images and label JSONs into shards + manifest",
        description="Read images and labels straight from the zips, pair them by file name, "
        "group them by battery (or the --profile's group), split train/val/test by group and "
        "write WebDataset tar shards, OUT/manifest.parquet, OUT/rejects.parquet and "
        "OUT/summary.json.",
    )
    conv.add_argument("sources", nargs="+", metavar="SOURCE",
                      help="a folder (searched recursively) or files: zips, .zip.partN "
                      "pieces, .z01 volumes, download.tar; or such a prefix or file in "
                      "object storage as a URL (s3://bucket/prefix), read in place")
    conv.add_argument("--out", required=True, metavar="OUT",
                      help="output folder or fsspec URL (s3://bucket/prefix): new, empty, or "
                      "an earlier shardify output of the same command (resumed: complete "
                      "shards are kept)")
    conv.add_argument("--shard-size", type=parse_size, default=parse_size("1GiB"),
                      metavar="SIZE", help="largest shard size, e.g. 1GiB (default), 512MiB")
    conv.add_argument("--split", type=parse_split, default="70/10/20", metavar="TRAIN/VAL/TEST",
                      help="ratios of batteries per split (default 70/10/20; 80/0/20 works)")
    conv.add_argument("--seed", type=parse_seed, default=0,
                      help="seed of the split (default 0)")
    conv.add_argument("--strict", action="store_true",
                      help="exit 1 if any input was rejected")
    conv.add_argument("--manifest", type=Path, metavar="PATH",
                      help="also write the manifest here (and PATH's .summary.json beside it), "
                      "e.g. manifests/aihub-71687.parquet")
    _add_profile(conv)
    conv.add_argument("--workers", type=_positive_int, default=CORES,
                      metavar="N", help=f"processes writing shards (default: all cores this "
                      f"process may use, {CORES} here)")
    conv.add_argument("--executor", choices=("local", "ray"), default="local",
                      help="who writes the shards: local (default: --workers processes on "
                      "this machine) or ray (one Ray task per shard: a local Ray with --workers "
                      "CPUs, or the cluster at --ray-address)")
    conv.add_argument("--ray-address", metavar="ADDR",
                      help="with --executor ray: the Ray cluster to run on (its head's "
                      "HOST:PORT, or auto) instead of a local Ray; local SOURCE and OUT paths "
                      "must be the same on every node")
    conv.add_argument("--overwrite", action="store_true",
                      help="discard an earlier, different conversion in OUT and start over")
    conv.add_argument("--no-space-check", dest="space_check", action="store_false",
                      help="write even if OUT's disk looks too small for the output")
    conv.add_argument("--quiet", action="store_true", help="no progress output")
    conv.add_argument("--consume-sources", action="store_true",
                      help="delete each source zip (each .partN piece; holes punched in a "
                      "download.tar) once everything in it is in durable shards, so full-size "
                      "shards fit on the download's own drive; sources holding any reject are "
                      "kept. Asks first on a terminal")
    conv.add_argument("--yes", action="store_true",
                      help="agree to --consume-sources without being asked (needed without a "
                      "terminal)")
    _add_storage_option(conv)
    shaping = conv.add_argument_group(
        "image transforms", "done in the workers while converting; labels follow the pixels\n"
        "(coordinates mapped, image_info.width/height set to the written size).\n"
        "Without any of these, shards hold the sources' bytes unchanged.")
    shaping.add_argument("--crop", choices=CROPS, help="crop each image to the bounding box of "
                         "its label's battery outline (images without a usable outline are "
                         "kept whole)")
    shaping.add_argument("--crop-margin", type=_whole, default=DEFAULT_MARGIN, metavar="PX",
                         help=f"widen the crop box by PX source pixels on every side, clamped "
                         f"to the image (default {DEFAULT_MARGIN})")
    shaping.add_argument("--resize", type=_positive_int, metavar="N",
                         help="scale so the longer side is at most N pixels (LANCZOS; aspect "
                         "ratio kept, never enlarged)")
    shaping.add_argument("--format", choices=FORMATS, default="keep",
                         help="image format written: keep (default: JPEG stays JPEG, PNG stays "
                         "PNG), jpeg, png, or webp (lossless unless --quality is given)")
    shaping.add_argument("--quality", type=_quality, metavar="Q",
                         help=f"quality of lossy formats, 1-100 (default {DEFAULT_QUALITY} for "
                         "JPEG)")

    survey = _subcommand(
        commands, "scan",
        help="show what convert would find, without writing anything",
        description="List the archives found (zip, pieces, tar member, volumes, nested), their "
        "members, images/labels/pairs/orphans, the profile's groups and classes, compression "
        "methods, problems and the estimated output size. Reads only central directories and "
        "labels.",
    )
    survey.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="folders, zips, .zip.partN pieces, .z01 volumes or download.tar; "
                        "local or URLs (s3://bucket/prefix)")
    survey.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_profile(survey)
    _add_storage_option(survey)

    check = _subcommand(
        commands, "verify",
        help="check an output folder: shards, manifest, labels, battery leakage, counts",
        description="Read every shard once with tarfile and check it against manifest.parquet "
        "and summary.json: USTAR members, adjacency, offsets, sizes, CRCs, .cls vs JSON vs "
        "manifest label, no battery in two splits, counts. Exit 0 if clean, 1 if not.",
    )
    check.add_argument("out", metavar="OUT", help="the output folder (or URL) to check")
    _add_moved_profile(check)
    check.add_argument("--sources", nargs="+", metavar="SOURCE",
                       help="also compare every sample with its source members (size and "
                       "CRC-32); give the SOURCE arguments that convert was given")
    _add_storage_option(check)

    show = _subcommand(
        commands, "report",
        help="show the dataset at a glance: class balance, defects, sizes, batteries",
        description="Per split: samples, batteries, normal/defect counts and ratio, the "
        "requested and achieved split ratios, by data_type and form; defect types "
        "(case-folded); swelling; image sizes; samples per battery; the rejects by reason and "
        "the first rows. From OUT's manifest.parquet, rejects.parquet and summary.json.",
    )
    show.add_argument("out", metavar="OUT", help="a shardify output folder (or URL)")
    show.add_argument("--html", type=Path, metavar="PATH",
                      help="also write one self-contained HTML page with tables, plots and a "
                      "gallery of thumbnails from the shards with their labels' polygons drawn")
    _add_moved_profile(show)
    _add_storage_option(show)

    synth = _subcommand(
        commands, "synth",
        help="write a small AI-Hub-shaped sample dataset (for demos and tests)",
        description="Write a small dataset with the folder layout, file names, label JSON and "
        "quirks of the --profile's dataset (the battery set by default: CP949 names, a battery "
        "over two zips, a few bad inputs).",
    )
    synth.add_argument("dest", type=Path, metavar="DIR",
                       help="folder to write the sample dataset into")
    synth.add_argument("--seed", type=int, default=0,
                       help="seed of the generated images and labels (default 0)")
    synth.add_argument("--scale", type=_positive_int, default=1,
                       help="multiply batteries and images (default 1)")
    _add_profile(synth)
    listing = _subcommand(
        commands, "profiles",
        help="list the built-in dataset profiles and their -P options",
        description="List the built-in dataset profiles (--profile NAME) with their version, "
        "classes, group and each -P option's values and default. --profile FILE.py also "
        "lists a profile file's.",
    )
    listing.add_argument("--profile", metavar="FILE.py", action="append", default=[],
                         help="also list this profile file (repeatable)")
    _add_export(commands)
    return parser


def _readable_out(args: argparse.Namespace) -> Location:
    """OUT for a reader, a path or a URL (with the --storage-option options); a URL's bucket
    and credentials checked now, said in one line."""
    from .output.remote import RemoteOutputStore

    out = location(args.out, parse_storage_options(args.storage_options))
    if isinstance(out, RemotePath):
        RemoteOutputStore(out).check_access()
    return out


def _local_out(text: str) -> Path:
    if is_url(text):
        raise argparse.ArgumentTypeError(f"{text}: export reads a local OUT only (copy it "
                                         "first, e.g. aws s3 sync)")
    return Path(text)


def _add_export(commands: argparse._SubParsersAction) -> None:
    from .export import LAYOUTS

    files = _subcommand(
        commands, "export",
        help="write a selection of samples as image files (anomalib Folder, ImageFolder)",
        description="Write the selected samples of one split as image files under DIR, the "
        "bytes exactly as the shards hold them, named by sample key, each checked against the "
        "manifest's CRC-32. Layout folder (anomalib's Folder): DIR/normal/ (class 0), "
        "DIR/abnormal/ and DIR/masks/KEY.png (defect polygons white on black, the size of the "
        "image). Layout imagefolder (torchvision's ImageFolder): DIR/0_normal/, "
        "DIR/1_defect/. DIR/export.json records what was exported. DIR appears complete or "
        "not at all.",
    )
    files.add_argument("out", type=_local_out, metavar="OUT",
                       help="a shardify output folder (local)")
    files.add_argument("dest", type=Path, metavar="DIR",
                       help="folder to write: new or empty (or an earlier export, with "
                       "--overwrite)")
    files.add_argument("--split", choices=SPLITS, default="train",
                       help="the split to export (default train)")
    files.add_argument("--select", action="append", default=[], metavar="COLUMN=VALUE[,...]",
                       help="keep samples whose manifest COLUMN equals VALUE (any of several "
                       "VALUEs, comma-separated), cast to the column's type; repeat to AND, "
                       "e.g. --select data_type=ct --select label=0")
    files.add_argument("--layout", choices=LAYOUTS, default="folder",
                       help="folder: anomalib's Folder (normal/, abnormal/, masks/; default); "
                       "imagefolder: torchvision's ImageFolder (one folder per class)")
    files.add_argument("--overwrite", action="store_true",
                       help="replace DIR if it holds an earlier shardify export")
    files.add_argument("--quiet", action="store_true", help="no progress output")
    _add_moved_profile(files)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (see EXIT_CODES) instead of raising."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    try:
        code = _run(args)
        sys.stdout.flush()  # a closed stdout shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader is gone (`| head`): stop writing, quietly, as coreutils do. stdout is
        # pointed at /dev/null so that what is still buffered is not flushed into the pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_STDOUT_CLOSED
    except UsageError as error:
        print(f"shardify: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(f"shardify: {'terminated' if terminated else 'interrupted'}"
              f"{AFTER_INTERRUPT.get(args.command, '')}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except OSError as error:
        print(f"shardify: error: {_with_path_texts(error)}", file=sys.stderr)
        return EXIT_REJECTS


def _with_path_texts(error: OSError) -> OSError:
    """The error naming its files as `path_text` shows them (a CP949 name read, not escaped)."""
    for attribute in ("filename", "filename2"):
        if isinstance(getattr(error, attribute), str):
            setattr(error, attribute, path_text(getattr(error, attribute)))
    return error


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        return _convert(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "scan":
        return _scan(args)
    if args.command == "report":
        return _report(args)
    if args.command == "export":
        return _export(args)
    if args.command == "profiles":
        return _profiles(args)
    return _synth(args)


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert
    from .errors import NotEnoughSpace, RunFailed
    from .transform.options import TransformOptions

    if args.consume_sources and not args.yes and not sys.stdin.isatty():
        raise UsageError("--consume-sources deletes the sources as they are converted: without "
                         "a terminal to ask on, give --yes to agree")
    storage = parse_storage_options(args.storage_options)
    profile, spec = _profile(args)
    options = ConvertOptions(
        sources=args.sources, out=location(args.out, storage), shard_size=args.shard_size,
        split=args.split.text,
        ratios=args.split.ratios, seed=args.seed, manifest=args.manifest, strict=args.strict,
        quiet=args.quiet, overwrite=args.overwrite, space_check=args.space_check,
        workers=args.workers, executor=args.executor, ray_address=args.ray_address,
        transform=TransformOptions(args.crop, args.crop_margin, args.resize, args.format,
                                   args.quality),
        consume_sources=args.consume_sources,
        confirm=functools.partial(_confirm, asked=not args.yes),
        profile=profile, profile_spec=spec,
        storage_options=storage,
    )
    try:
        report = convert(options)
    except RunFailed as error:
        print(f"shardify: error: {error}", file=sys.stderr)
        return EXIT_REJECTS
    except NotEnoughSpace as error:
        print(f"shardify: error: {error}", file=sys.stderr)
        return EXIT_NO_SPACE
    print(format_report(report))
    return EXIT_REJECTS if args.strict and report.rejects else EXIT_OK


def _confirm(plan: str, *, asked: bool) -> bool:
    """Show what --consume-sources will delete; on a terminal (without --yes) ask once."""
    print(plan, file=sys.stderr)
    if not asked:
        return True
    try:
        answer = input("Delete these sources as they are converted? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in {"y", "yes"}


def format_report(report: ConvertReport) -> str:
    """The end-of-run summary: per split, rejects by reason, bytes in and out, time."""
    from .scan import dataset_lines

    summary = report.summary
    lines = [f"shardify: wrote {summary['samples']} samples to {path_text(str(report.out))} "
             f"in {report.seconds:.1f} s"]
    if report.resumed_shards:
        lines.append(f"  resumed: {report.resumed_shards} complete shards from an earlier run "
                     "kept")
    groups = report.group_unit
    lines.append(f"  {'split':<6} {'samples':>9} {groups:>9} {'shards':>6} {'bytes':>11}")
    for split in SPLITS:
        row = summary["splits"][split]
        lines.append(f"  {split:<6} {row['samples']:>9} {row[groups]:>9} "
                     f"{len(row['shards']):>6} {human_bytes(row['bytes']):>11}")
    rejects = summary["rejects"]
    if rejects:
        by_reason = ", ".join(f"{reason} {count}" for reason, count in rejects.items())
        lines.append(f"  rejects: {sum(rejects.values())} ({by_reason}) "
                     f"-> {path_text(str(report.out / REJECTS))}")
    else:
        lines.append("  rejects: none")
    skipped = [f"{summary['ignored_members']} junk members (folders, __MACOSX, Thumbs.db, ...)"]
    if summary["identical_duplicates"]:
        skipped.append(f"{summary['identical_duplicates']} identical duplicate copies")
    if summary["other_files"]:
        skipped.append("other files: " + ", ".join(
            f"{ext} {count}" for ext, count in summary["other_files"].items()))
    lines.append("  skipped: " + "; ".join(skipped))
    lines += [f"  {line}" for line in dataset_lines(summary["dataset"])]
    lines += [f"  note: {archive['name']}: {note}"
              for archive in summary["archives"] for note in archive["notes"]]
    done = summary.get("transformed")
    if done:
        lines.append(f"  transformed: {done['images']} images, {done['cropped']} cropped to "
                     f"their outline, {done['no_outline']} kept whole (no usable outline); "
                     f"{done['unmapped_point_lists']} label point lists left as they were "
                     "(odd length or not numbers)")
        if done["continuation_shards"]:
            lines.append(f"  note: {done['continuation_shards']} continuation shards "
                         "(shard-NNNNNN_K.tar) took samples whose shard was full: their "
                         "transformed size was larger than estimated")
    lines.append(f"  bytes in: {human_bytes(summary['bytes_in'])} from "
                 f"{len(summary['archives'])} archives; bytes out: "
                 f"{human_bytes(summary['bytes_out'])}")
    consumed = report.consumed
    if consumed is not None:
        lines.append(f"  sources released: {len(consumed['released'])} "
                     f"({human_bytes(consumed['bytes_freed'])} freed; "
                     f"{consumed['released_now']} by this run) -> "
                     f"{path_text(str(report.out / CONSUMED))}")
        lines += [f"  kept: {name}: {why}" for name, why in consumed["kept"].items()]
    return "\n".join(lines)


def _scan(args: argparse.Namespace) -> int:
    """Print the scan report as text or JSON; scanning never fails on bad inputs (exit 0)."""
    from .scan import format_scan, scan  # each subcommand imports only what it needs

    report = scan(args.sources, _profile(args)[0], parse_storage_options(args.storage_options))
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_scan(report))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from .report import format_text, load_manifest, report_data, write_html

    out = _readable_out(args)
    try:
        manifest, profile = load_manifest(out, args.profile)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    data = report_data(manifest, profile, out)
    print(format_text(data, profile))
    if args.html is not None:
        write_html(data, manifest, args.html, f"shardify report: {path_text(args.out)}",
                   profile, out)
        print(f"\nHTML report written to {path_text(args.html)}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from .errors import OutputMissing
    from .verify import verify_output

    try:
        checked, problems, released = verify_output(
            _readable_out(args), args.sources, parse_storage_options(args.storage_options),
            args.profile)
    except (OutputMissing, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if released:
        print(f"verify: {released} samples not compared with their sources: those were "
              "released by convert --consume-sources (see consumed.json)")
    if not problems:
        against = " and their sources" if args.sources else ""
        if released:
            against = f", {checked - released} of them their sources too"
        print(f"verify: OK: {checked} samples in {path_text(args.out)} match their "
              f"manifest{against}")
        return EXIT_OK
    print(f"verify: FAILED: {len(problems)} problems in {path_text(args.out)} ({checked} "
          "manifest rows)")
    for problem in problems:
        print(problem)
    return EXIT_REJECTS


def _profiles(args: argparse.Namespace) -> int:
    """Each profile: name, version, classes, group; each option with its values and default."""
    lines: list[str] = []
    for spec in (*BUILT_IN, *args.profile):
        profile = get_profile(spec)
        where = "" if spec in BUILT_IN else f" ({path_text(spec)})"
        title = f": {profile.card.title}" if profile.card.title else ""
        lines += [f"{profile.name} (version {profile.version}){where}{title}",
                  *textwrap.wrap(f"group: {profile.group_noun}; classes: "
                                 f"{', '.join(profile.class_names)}", 96,
                                 initial_indent="  ", subsequent_indent="    ")]
        for key, option in profile.options.items():
            values = "|".join(option.choices) if option.choices else "TEXT"
            lines += [f"  -P {key}={values}", *textwrap.wrap(
                f"{option.help} (default {option.default})", 96, initial_indent="      ",
                subsequent_indent="      ")]
        lines.append("")
    print("\n".join(lines).rstrip())
    return EXIT_OK


def _synth(args: argparse.Namespace) -> int:
    result = _profile(args)[0].synthesize(args.dest, seed=args.seed, scale=args.scale)
    print(f"shardify: sample dataset written to {path_text(result.root)}: {result.samples} "
          f"image/label pairs, planted rejects {result.rejects}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from .errors import ExportFailed, NotEnoughSpace
    from .export import ExportOptions, export

    try:
        report = export(ExportOptions(args.out, args.dest, args.split, tuple(args.select),
                                      args.layout, args.overwrite, args.quiet, args.profile))
    except ExportFailed as error:
        print(f"shardify: error: {error}; {path_text(args.dest)} is unchanged",
              file=sys.stderr)
        return EXIT_REJECTS
    except NotEnoughSpace as error:
        print(f"shardify: error: {error}", file=sys.stderr)
        return EXIT_NO_SPACE
    record = report.record
    lines = [f"shardify: exported {report.samples} {args.split} samples from "
             f"{path_text(args.out)} to {path_text(report.dest)} ({args.layout}) in "
             f"{report.seconds:.1f} s",
             f"  {'folder':<12} {'files':>8} {'bytes':>11}"]
    lines += [f"  {name:<12} {row['files']:>8} {human_bytes(row['bytes']):>11}"
              for name, row in record["folders"].items()]
    if args.layout == "folder" and "masks" in record["folders"]:
        lines.append(f"  masks: {record['masks_empty']} all black (no usable defect polygon); "
                     f"{record['unusable_polygons']} defect point lists skipped (odd length, "
                     "not numbers or < 3 points)")
    renumbered = {name: index for name, index in record.get("class_to_idx", {}).items()
                  if int(name.split("_", 1)[0]) != index}
    if renumbered:
        lines.append(f"  warning: not every class is here, so torchvision's ImageFolder numbers "
                     f"{', '.join(f'{n} as {i}' for n, i in renumbered.items())} (not the "
                     "manifest's label): see class_to_idx in export.json")
    print("\n".join(lines))
    return EXIT_OK
