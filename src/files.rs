//! Writing files whole, so that a crash never leaves one cut short.

use std::fs::Permissions;
use std::io::{self, Write};
use std::path::Path;

/// Replaces the file at `path` with `contents`, whole or not at all (see
/// [`write_whole`]).
pub fn replace(path: &Path, contents: &[u8], permissions: Option<Permissions>) -> io::Result<()> {
    write_whole(path, permissions, |file| file.write_all(contents))
}

/// Writes the file at `path` whole or not at all: `write` fills a new file
/// beside it, which is synced and renamed over it, then the folder is
/// synced. Writing in place would leave the file empty or cut short if the
/// process died (or the disk filled) during the write, and an earlier
/// version of it lost. If `write` fails, `path` is left as it was and the
/// new file is removed.
///
/// The file gets `permissions`; with `None`, those of the file it replaces,
/// or those of any new file (subject to the umask) when there was none.
/// A symbolic link, a device or a pipe at `path` is written through in
/// place instead, as by any other program (so without that guarantee).
pub fn write_whole<T, E: From<io::Error>>(
    path: &Path,
    permissions: Option<Permissions>,
    write: impl FnOnce(&mut dyn Write) -> Result<T, E>,
) -> Result<T, E> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let prefix = format!(".{name}.");
    let existing = match std::fs::symlink_metadata(path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    // A link, a device or a pipe (`-o /dev/stdout`) is written through, as
    // any program would: renaming over it would replace the link itself.
    if existing
        .as_ref()
        .is_some_and(|meta| !meta.is_file() && !meta.is_dir())
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)?;
        let mut out = io::BufWriter::new(file);
        let written = write(&mut out)?;
        out.flush()?;
        return Ok(written);
    }
    let permissions = permissions
        .or_else(|| existing.map(|meta| meta.permissions()))
        .or_else(new_file_permissions);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    if let Some(permissions) = permissions {
        builder.permissions(permissions);
    }
    let file = builder.tempfile_in(folder)?;
    let mut out = io::BufWriter::new(file);
    let written = write(&mut out)?;
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(folder)?.sync_all()?;
    remove_stale(folder, &prefix);
    Ok(written)
}

/// New files of an earlier write of the same file that a crash left behind
/// (`.{name}.XXXXXX.tmp`); one younger than [`STALE_AFTER`] may be another
/// process's write under way, and is left alone. Best effort: they are
/// clutter, not harm.
fn remove_stale(folder: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = name.starts_with(prefix)
            && name.ends_with(".tmp")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_AFTER));
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// How old a left-behind new file must be to be removed.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a file created the ordinary way gets: read and write for all, less
/// the umask (the temporary file's own default is owner-only).
fn new_file_permissions() -> Option<Permissions> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Some(Permissions::from_mode(0o666))
    }
    #[cfg(not(unix))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the files in `dir`, sorted.
    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
    use std::io::Read;

    /// Regression (the tokens file, then an imported catalogue): files were
    /// truncated and rewritten in place. A reader holding the old file must
    /// still read it whole after the replacement.
    #[test]
    fn a_replaced_file_is_never_rewritten_in_place_and_keeps_its_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("permits.ron");
        std::fs::write(&path, "old").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, Permissions::from_mode(0o640)).expect("chmod");
        }
        let mut held = std::fs::File::open(&path).expect("open");
        replace(&path, b"new", None).expect("replaced");
        let mut old = String::new();
        held.read_to_string(&mut old).expect("read");
        assert_eq!(old, "old", "the old file was changed in place");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o640);
        }
        assert_eq!(names_in(dir.path()), ["permits.ron"]);
    }

    /// Regression (`audit export -o`, `graph -o`): an output was created in
    /// place, so an export that failed half-way left a file that passed for
    /// a complete one, in place of the earlier export.
    #[test]
    fn a_write_that_fails_half_way_leaves_the_earlier_file_and_no_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("export.jsonl");
        std::fs::write(&path, "earlier export\n").expect("write");
        let failed: io::Result<()> = write_whole(&path, None, |file| {
            file.write_all(b"first half\n")?;
            Err(io::Error::other("the store failed"))
        });
        assert_eq!(failed.expect_err("fails").to_string(), "the store failed");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "earlier export\n"
        );
        assert_eq!(names_in(dir.path()), ["export.jsonl"]);
    }

    /// A new file gets what any new file gets (the umask applies), not the
    /// owner-only mode of a temporary file: a drawn graph is for sharing.
    #[cfg(unix)]
    #[test]
    fn a_new_file_gets_the_permissions_of_any_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ordinary = dir.path().join("ordinary.svg");
        std::fs::write(&ordinary, "<svg/>").expect("write");
        let path = dir.path().join("graph.svg");
        replace(&path, b"<svg/>", None).expect("written");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&ordinary));
    }

    /// Regression: `graph -o /dev/stdout` renamed a file over the link
    /// `/dev/stdout` (seen as root). A link, a device or a pipe is written
    /// through, never replaced.
    #[cfg(unix)]
    #[test]
    fn a_link_or_a_device_is_written_through_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("shared-permits.ron");
        std::fs::write(&target, "old").expect("write");
        let link = dir.path().join("permits.ron");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        replace(&link, b"new", None).expect("written");
        assert!(std::fs::symlink_metadata(&link).expect("meta").is_symlink());
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "new");

        replace(Path::new("/dev/null"), b"picture", None).expect("written");
        let null = std::fs::symlink_metadata("/dev/null").expect("meta");
        assert!(null.file_type().is_char_device());
    }

    /// A new file a crash left behind is removed by the next write of the
    /// same file once it is old; a young one (a write under way) is kept.
    #[test]
    fn files_left_by_a_crashed_write_are_removed_once_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentials.toml");
        let old = dir.path().join(".credentials.toml.Ab12Cd.tmp");
        let young = dir.path().join(".credentials.toml.Ef34Gh.tmp");
        let other = dir.path().join(".permits.ron.Ij56Kl.tmp");
        for leftover in [&old, &young, &other] {
            std::fs::write(leftover, "half").expect("write");
        }
        let long_ago = std::time::SystemTime::now() - 2 * STALE_AFTER;
        for aged in [&old, &other] {
            std::fs::File::options()
                .write(true)
                .open(aged)
                .and_then(|f| f.set_modified(long_ago))
                .expect("aged");
        }
        replace(&path, b"tokens", None).expect("written");
        assert!(!old.exists(), "an old leftover stays");
        assert!(young.exists(), "a write under way was removed");
        assert!(other.exists(), "another file's leftover was removed");
    }
}
