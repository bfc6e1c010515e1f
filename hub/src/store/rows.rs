//! What both store backends share: turning database values into API types and deciding what a
//! head read means (serve the newest version record, or first record a version that another
//! program made by bumping `sync_metadata.version`). Pure functions, no I/O, so the rules live
//! in one place and are unit-tested here.

use super::StoreError;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use synchub_protocol::{Head, Role, Sha256Hex, VersionInfo};

/// `reason` of a version the hub records because another program bumped the row.
pub(crate) const OUTSIDE_BUMP_REASON: &str = "version bumped outside the hub";

/// `reason` of the version recorded for a row the hub found without any content it knows
/// (system 1's row): the hub holds no data for it, so it is never announced as ready data.
pub const ADOPTED_WITHOUT_DATA_REASON: &str =
    "adopted from the existing sync_metadata row; the hub has no data for it yet";

/// Most rows one listing returns (`versions`, `sync_log`); a limit of 0 means this many.
pub(crate) const MAX_LIST: u32 = 1000;

pub(crate) fn list_limit(limit: u32) -> i64 {
    i64::from(if limit == 0 {
        MAX_LIST
    } else {
        limit.min(MAX_LIST)
    })
}

/// A timestamp as the API carries it: RFC 3339, UTC, milliseconds (`2026-11-24T10:00:00.123Z`).
/// Fixed width, so that in SQLite (TEXT) they also sort in time order.
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Reads a timestamp written by the hub, a client, or another program: RFC 3339, or SQLite's
/// `datetime('now')` form `YYYY-MM-DD HH:MM:SS[.fff]` (taken as UTC).
pub(crate) fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc());
        }
    }
    None
}

/// A timestamp as read from the database: a time, or text in no format [`parse_timestamp`]
/// knows (written by another program), kept as it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stamp {
    At(DateTime<Utc>),
    Text(String),
}

impl Stamp {
    /// Reads a timestamp stored as text.
    pub fn parse(text: String) -> Stamp {
        match parse_timestamp(&text) {
            Some(at) => Stamp::At(at),
            None => Stamp::Text(text),
        }
    }

    /// The time, when it is one.
    pub fn at(self) -> Option<DateTime<Utc>> {
        match self {
            Stamp::At(at) => Some(at),
            Stamp::Text(_) => None,
        }
    }

    /// As the API shows it: RFC 3339 (see [`rfc3339`]), or the stored text.
    pub fn shown(self) -> String {
        match self {
            Stamp::At(at) => rfc3339(at),
            Stamp::Text(text) => text,
        }
    }
}

/// A count from the API into a BIGINT column (saturating: nobody syncs 2^63 bytes).
pub(crate) fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A BIGINT column that must not be negative (versions, sizes).
pub(crate) fn from_db(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative {what}: {n}")))
}

pub(crate) fn parse_hash(s: String) -> Result<Sha256Hex, StoreError> {
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("version data_hash: {e}")))
}

pub(crate) fn parse_role(s: &str) -> Result<Role, StoreError> {
    s.parse()
        .map_err(|e: String| StoreError::Corrupt(format!("token role: {e}")))
}

/// `synchub_tokens.spaces`: a JSON array, NULL for every space.
pub(crate) fn encode_spaces(spaces: Option<&[String]>) -> Option<String> {
    spaces.map(|s| serde_json::Value::from(s.to_vec()).to_string())
}

/// Reads `synchub_tokens.spaces`: a JSON array, or a comma list typed by hand.
pub(crate) fn decode_spaces(raw: Option<String>) -> Result<Option<Vec<String>>, StoreError> {
    let Some(raw) = raw else { return Ok(None) };
    let raw = raw.trim();
    if raw.starts_with('[') {
        serde_json::from_str(raw)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("token spaces {raw:?}: {e}")))
    } else {
        Ok(Some(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }
}

/// A `sync_metadata` row joined with the newest version record of its space.
pub(crate) struct HeadRow {
    pub space: String,
    pub row_version: i64,
    pub row_by: Option<String>,
    /// `last_modified_at`, else `updated_at`.
    pub row_at: Option<DateTime<Utc>>,
    pub newest: Option<VersionInfo>,
}

/// A version record the store must insert (ON CONFLICT DO NOTHING) before it can serve a head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PendingVersion {
    pub space: String,
    pub version: u64,
    pub data_hash: Sha256Hex,
    pub forced: bool,
    pub reason: Option<String>,
    pub by: Option<String>,
    pub at: DateTime<Utc>,
    /// Entries and total size of the manifest `data_hash` names.
    pub entries: u64,
    pub bytes: u64,
}

impl PendingVersion {
    /// The head this version is once recorded (epoch and forced_version are the hub's, in memory).
    pub fn into_head(self) -> Head {
        Head {
            space: self.space,
            version: self.version,
            data_hash: self.data_hash,
            forced: self.forced,
            reason: self.reason,
            by: self.by,
            at: rfc3339(self.at),
            epoch: 0,
            forced_version: 0,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeadPlan {
    Serve(Head),
    Record(PendingVersion),
}

/// What a head read means. The row is the truth about the version number (system 1 and plain
/// SQL bump it); version records are the truth about content. A row above the newest record
/// is a bump made outside the hub: recorded as forced with the previous content, unless the
/// space is `fed` by sources, which record it themselves with freshly read content (the newest
/// record is served meanwhile). A row with no record (system 1's row) is recorded with the
/// empty manifest and [`ADOPTED_WITHOUT_DATA_REASON`], which the hub never announces as data.
/// A row below the newest record (someone lowered it) is logged and the newest record kept.
pub(crate) fn plan_head(row: HeadRow, fed: bool) -> Result<HeadPlan, StoreError> {
    let row_version = from_db(row.row_version, "sync_metadata.version")?;
    match row.newest {
        None => Ok(HeadPlan::Record(PendingVersion {
            space: row.space,
            version: row_version,
            data_hash: Sha256Hex::empty(),
            forced: false,
            reason: Some(ADOPTED_WITHOUT_DATA_REASON.to_owned()),
            by: row.row_by,
            at: row.row_at.unwrap_or_else(Utc::now),
            entries: 0,
            bytes: 0,
        })),
        Some(newest) if newest.head.version < row_version => {
            if fed {
                return Ok(HeadPlan::Serve(newest.head));
            }
            let (by, at) = bump_author(row.row_by, row.row_at, &newest);
            Ok(HeadPlan::Record(PendingVersion {
                space: row.space,
                version: row_version,
                data_hash: newest.head.data_hash,
                forced: true,
                reason: Some(OUTSIDE_BUMP_REASON.to_owned()),
                by,
                at,
                entries: newest.entries,
                bytes: newest.bytes,
            }))
        }
        Some(newest) => {
            if newest.head.version > row_version {
                tracing::warn!(
                    space = %row.space,
                    row_version,
                    newest = newest.head.version,
                    "sync_metadata.version was lowered below the newest recorded version; \
                     serving the newest recorded version"
                );
            }
            Ok(HeadPlan::Serve(newest.head))
        }
    }
}

/// Who made an outside bump and when. A plain `UPDATE ... SET version = version + 1` leaves
/// `last_modified_by`/`_at` as the previous writer left them. The row's time counts only when
/// it is later than the newest record's (the hub's clock, when it noticed, otherwise); its name
/// counts when that time is fresh or the name differs from the newest record's author (a bump
/// that set only the name); otherwise nobody is named.
fn bump_author(
    row_by: Option<String>,
    row_at: Option<DateTime<Utc>>,
    newest: &VersionInfo,
) -> (Option<String>, DateTime<Utc>) {
    let newest_ms = parse_timestamp(&newest.head.at).map_or(i64::MIN, |t| t.timestamp_millis());
    let fresh_at = row_at.filter(|at| at.timestamp_millis() > newest_ms);
    let by = row_by.filter(|by| fresh_at.is_some() || newest.head.by.as_ref() != Some(by));
    (by, fresh_at.unwrap_or_else(Utc::now))
}

/// The record that an outside bump of `row` gets when sources supply its content: the row's
/// version with `content` (data hash, entries, bytes), forced only when the content did not
/// change. `None` when the row is not above the newest record (nothing to record).
pub(crate) fn plan_fed_bump(
    row: HeadRow,
    content: &super::NewVersion,
) -> Result<Option<PendingVersion>, StoreError> {
    let newest_hash = row.newest.as_ref().map(|n| n.head.data_hash.clone());
    let HeadPlan::Record(mut pending) = plan_head(row, false)? else {
        return Ok(None);
    };
    pending.forced = newest_hash.as_ref() == Some(&content.data_hash);
    pending.data_hash = content.data_hash.clone();
    pending.entries = content.entries;
    pending.bytes = content.bytes;
    pending.reason = Some(match &content.reason {
        Some(r) => format!("{OUTSIDE_BUMP_REASON}; {r}"),
        None => OUTSIDE_BUMP_REASON.to_owned(),
    });
    Ok(Some(pending))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u64, hash: &Sha256Hex) -> VersionInfo {
        VersionInfo {
            head: Head {
                space: "s".into(),
                version,
                data_hash: hash.clone(),
                forced: false,
                reason: None,
                by: Some("hub".into()),
                at: "2026-01-01T00:00:00.000Z".into(),
                epoch: 0,
                forced_version: 0,
            },
            entries: 1,
            bytes: 2,
        }
    }

    fn row(version: i64, newest: Option<VersionInfo>) -> HeadRow {
        HeadRow {
            space: "s".into(),
            row_version: version,
            row_by: Some("desktop".into()),
            row_at: parse_timestamp("2026-02-02T00:00:00Z"),
            newest,
        }
    }

    #[test]
    fn a_row_without_record_is_recorded_as_having_no_data() {
        let HeadPlan::Record(p) = plan_head(row(7, None), false).unwrap() else {
            panic!("expected a record")
        };
        assert_eq!((p.version, p.forced), (7, false));
        assert_eq!(p.data_hash, Sha256Hex::empty());
        assert_eq!(p.by.as_deref(), Some("desktop"));
        assert_eq!(p.reason.as_deref(), Some(ADOPTED_WITHOUT_DATA_REASON));
    }

    #[test]
    fn an_outside_bump_is_forced_with_the_previous_content() {
        let hash = Sha256Hex::of(b"m");
        let HeadPlan::Record(p) = plan_head(row(5, Some(record(4, &hash))), false).unwrap() else {
            panic!("expected a record")
        };
        assert_eq!((p.version, p.forced), (5, true));
        assert_eq!(p.data_hash, hash);
        assert_eq!(p.reason.as_deref(), Some(OUTSIDE_BUMP_REASON));
        assert_eq!(rfc3339(p.at), "2026-02-02T00:00:00.000Z");
        assert_eq!(
            p.by.as_deref(),
            Some("desktop"),
            "the row names who bumped it"
        );
        assert_eq!((p.entries, p.bytes), (1, 2), "the served manifest's size");
    }

    #[test]
    fn a_plain_sql_bump_names_nobody_and_uses_the_hubs_clock() {
        let hash = Sha256Hex::of(b"m");
        let mut newest = record(4, &hash);
        // The row still carries the previous writer's name and time.
        newest.head.at = "2026-02-02T00:00:00.000Z".into();
        newest.head.by = Some("desktop".into());
        let before = Utc::now();
        let HeadPlan::Record(p) = plan_head(row(5, Some(newest.clone())), false).unwrap() else {
            panic!("expected a record")
        };
        assert_eq!(p.by, None, "not the previous publisher");
        assert!(
            p.at >= before,
            "the hub's clock, not the previous version's time"
        );
        assert_eq!((p.entries, p.bytes), (1, 2));
        // A bump that set only the name is credited to that name, at the hub's clock.
        let mut named = row(5, Some(newest));
        named.row_by = Some("old-app".into());
        let HeadPlan::Record(p) = plan_head(named, false).unwrap() else {
            panic!("expected a record")
        };
        assert_eq!(p.by.as_deref(), Some("old-app"));
        assert!(p.at >= before);
    }

    #[test]
    fn a_fed_space_waits_for_its_sources_then_records_their_content() {
        let hash = Sha256Hex::of(b"m");
        assert_eq!(
            plan_head(row(5, Some(record(4, &hash))), true).unwrap(),
            HeadPlan::Serve(record(4, &hash).head)
        );
        let content = crate::store::NewVersion {
            data_hash: Sha256Hex::of(b"n"),
            forced: false,
            reason: Some("sources re-read".into()),
            by: None,
            entries: 3,
            bytes: 30,
        };
        let p = plan_fed_bump(row(5, Some(record(4, &hash))), &content)
            .unwrap()
            .expect("a record");
        assert_eq!((p.version, p.forced, p.entries), (5, false, 3));
        assert_eq!(p.data_hash, content.data_hash);
        assert!(
            plan_fed_bump(row(4, Some(record(4, &hash))), &content)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn equal_or_lowered_rows_serve_the_newest_record() {
        let hash = Sha256Hex::of(b"m");
        for v in [4, 2] {
            assert_eq!(
                plan_head(row(v, Some(record(4, &hash))), false).unwrap(),
                HeadPlan::Serve(record(4, &hash).head)
            );
        }
        assert!(plan_head(row(-1, None), false).is_err());
    }

    #[test]
    fn timestamps_and_spaces_round_trip() {
        let t = parse_timestamp("2026-11-24 10:00:00").unwrap();
        assert_eq!(rfc3339(t), "2026-11-24T10:00:00.000Z");
        let t = parse_timestamp("2026-11-24T12:00:00.5+02:00").unwrap();
        assert_eq!(rfc3339(t), "2026-11-24T10:00:00.500Z");
        assert!(parse_timestamp("yesterday").is_none());
        assert_eq!(
            Stamp::parse("2026-11-24 10:00:00".into()).shown(),
            "2026-11-24T10:00:00.000Z"
        );
        assert_eq!(Stamp::parse("yesterday".into()).shown(), "yesterday");
        assert_eq!(Stamp::parse("yesterday".into()).at(), None);
        let spaces = vec!["a".to_owned(), "b".to_owned()];
        let enc = encode_spaces(Some(&spaces));
        assert_eq!(decode_spaces(enc).unwrap(), Some(spaces.clone()));
        assert_eq!(decode_spaces(Some("a, b".into())).unwrap(), Some(spaces));
        assert_eq!(decode_spaces(None).unwrap(), None);
        assert_eq!(list_limit(0), 1000);
        assert_eq!(list_limit(5000), 1000);
        assert_eq!(list_limit(3), 3);
    }
}
