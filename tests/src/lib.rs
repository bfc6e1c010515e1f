//! The test harness: real hubs (`hub`), PostgreSQL clusters (`postgres`), an S3 server
//! (`s3`), agents and data sets (`fixtures`), a TCP proxy that fails on demand (`proxy`),
//! request helpers on a test hub (`requests`), headless Chromium (`browser`), a webhook receiver and an SMTP sink for alerts (`sinks`) and
//! the load generator (`load`), all on loopback; and
//! [`backend_matrix!`], which runs one suite against every backend.

pub mod browser;
pub mod fixtures;
pub mod hub;
pub mod load;
pub mod postgres;
pub mod proxy;
pub mod requests;
pub mod s3;
pub mod sinks;

/// Runs each named `async fn NAME(setup) -> anyhow::Result<()>` of the calling file once per
/// backend, as `BACKEND::NAME`: `backend_matrix!([sqlite => Backend::Sqlite, postgres =>
/// Backend::Postgres] test_a, test_b)`. Each setup expression is evaluated inside the
/// generated module, which sees everything the calling file has in scope; it may use `?`.
#[macro_export]
macro_rules! backend_matrix {
    ([] $($name:ident),* $(,)?) => {};
    ([$backend:ident => $setup:expr $(, $more:ident => $more_setup:expr)* $(,)?] $($name:ident),* $(,)?) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name($setup).await
                }
            )*
        }
        $crate::backend_matrix!([$($more => $more_setup),*] $($name),*);
    };
}
