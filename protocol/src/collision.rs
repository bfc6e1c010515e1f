//! Paths that are different on Linux but one file on Windows and macOS: `A.png` and `a.png`
//! (case), the NFC and NFD spellings of `Școala` (Unicode normalization), or a file `a` against
//! a folder `A/`. The hub refuses a version holding such a pair and the agent refuses to build
//! one, so a tree never has two entries that land on the same file.

use std::collections::HashMap;
use unicode_normalization::UnicodeNormalization;

/// Two paths of one set that name the same file or folder on a case-insensitive,
/// normalization-insensitive file system.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "paths {first:?} and {second:?} are the same on Windows and macOS (case or Unicode normalization)"
)]
pub struct PathCollision {
    /// The prefix of one path (a folder) or the whole path (a file) ...
    pub first: String,
    /// ... and the other spelling it collides with.
    pub second: String,
}

/// How Windows and macOS compare a name: NFC, then lower case, then NFC again (lower-casing
/// can decompose).
pub fn fold(name: &str) -> String {
    let lower: String = name.nfc().flat_map(char::to_lowercase).collect();
    lower.nfc().collect()
}

/// Checks that no two of `paths` (relative, `/`-separated, already valid) collide once folded:
/// neither two files, nor a file and a folder, nor two spellings of one folder.
pub fn check_collisions<'a>(paths: impl IntoIterator<Item = &'a str>) -> Result<(), PathCollision> {
    // folded prefix -> (spelling, whether it is a file)
    let mut seen: HashMap<String, (&'a str, bool)> = HashMap::new();
    for path in paths {
        let mut ends: Vec<usize> = path.match_indices('/').map(|(i, _)| i).collect();
        ends.push(path.len());
        for (n, &end) in ends.iter().enumerate() {
            let prefix = &path[..end];
            let is_file = n + 1 == ends.len();
            match seen.get(&fold(prefix)) {
                None => {
                    seen.insert(fold(prefix), (prefix, is_file));
                }
                // The same folder reached again through another file.
                Some(&(other, other_is_file)) if other == prefix && !is_file && !other_is_file => {}
                Some(&(other, _)) => {
                    return Err(PathCollision {
                        first: other.to_owned(),
                        second: prefix.to_owned(),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_paths_pass() {
        let paths = [
            "a/x.png",
            "a/y.png",
            "b/x.png",
            "Brașov/Școala.json",
            "Brașov/Liceul.json",
            "x",
        ];
        assert_eq!(check_collisions(paths), Ok(()));
    }

    #[test]
    fn case_pairs_collide() {
        let err = check_collisions(["img/A.png", "img/a.png"]).unwrap_err();
        assert_eq!(err.first, "img/A.png");
        assert_eq!(err.second, "img/a.png");
        assert!(check_collisions(["Dir/x", "dir/y"]).is_err());
        assert!(check_collisions(["ȘCOALA", "școala"]).is_err());
    }

    #[test]
    fn normalization_pairs_collide() {
        let nfc = "Școala.json"; // U+0218
        let nfd = "S\u{326}coala.json"; // S + combining comma below
        assert_ne!(nfc, nfd);
        let err = check_collisions([nfc, nfd]).unwrap_err();
        assert_eq!((err.first.as_str(), err.second.as_str()), (nfc, nfd));
        assert!(check_collisions(["Școala/a", "S\u{326}coala/b"]).is_err());
    }

    #[test]
    fn file_against_folder_collides() {
        assert!(check_collisions(["a", "A/b"]).is_err());
        assert!(check_collisions(["A/b", "a"]).is_err());
        // The exact clash too (Manifest::new also refuses it).
        assert!(check_collisions(["a/b", "a"]).is_err());
    }
}
