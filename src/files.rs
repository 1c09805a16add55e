//! Writing files whole, so that a crash never leaves one cut short.

use std::fs::Permissions;
use std::io::{self, Write};
use std::path::Path;

/// Replaces the file at `path` with `contents`, whole or not at all: they go
/// to a new file beside it, which is synced and renamed over it, then the
/// folder is synced. Rewriting a file in place would leave it empty or cut
/// short if the process died (or the disk filled) during the write.
///
/// The new file gets `permissions`; with `None`, those of the file it
/// replaces (owner-only when there was none).
pub fn replace(path: &Path, contents: &[u8], permissions: Option<Permissions>) -> io::Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let prefix = format!(".{name}.");
    let permissions = match permissions {
        Some(p) => Some(p),
        None => match std::fs::metadata(path) {
            Ok(meta) => Some(meta.permissions()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        },
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    if let Some(permissions) = permissions {
        builder.permissions(permissions);
    }
    let mut file = builder.tempfile_in(folder)?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(folder)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("permits.ron")]);
    }
}
