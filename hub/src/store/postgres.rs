//! PostgreSQL backend of [`super::Store`]: production, shared by several hub replicas.

use super::*;

pub struct PostgresStore {}

impl PostgresStore {
    pub async fn open(_url: &str) -> Result<Self, StoreError> {
        todo!("postgres store")
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        todo!()
    }
    async fn ensure_space(&self, _space: &str) -> Result<Head, StoreError> {
        todo!()
    }
    async fn head(&self, _space: &str) -> Result<Option<Head>, StoreError> {
        todo!()
    }
    async fn heads(&self) -> Result<Vec<Head>, StoreError> {
        todo!()
    }
    async fn create_version(
        &self,
        _space: &str,
        _expected: u64,
        _new: NewVersion,
    ) -> Result<Head, StoreError> {
        todo!()
    }
    async fn version(&self, _space: &str, _version: u64) -> Result<Option<Head>, StoreError> {
        todo!()
    }
    async fn versions(&self, _space: &str, _limit: u32) -> Result<Vec<VersionInfo>, StoreError> {
        todo!()
    }
    async fn insert_report(&self, _report: &SyncReport) -> Result<bool, StoreError> {
        todo!()
    }
    async fn sync_log(&self, _filter: &SyncLogFilter) -> Result<Vec<SyncLogEntry>, StoreError> {
        todo!()
    }
    async fn create_token(
        &self,
        _name: &str,
        _role: Role,
        _spaces: Option<&[String]>,
        _token_hash: &str,
    ) -> Result<TokenRecord, StoreError> {
        todo!()
    }
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        todo!()
    }
    async fn revoke_token(&self, _name: &str) -> Result<bool, StoreError> {
        todo!()
    }
    async fn watch(
        self: Arc<Self>,
        _poll_interval: Duration,
        _changes: mpsc::UnboundedSender<Change>,
        _shutdown: CancellationToken,
    ) {
        todo!()
    }
}
