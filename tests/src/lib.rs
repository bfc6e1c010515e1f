pub mod browser;
pub mod fixtures;
pub mod hub;
pub mod load;
pub mod postgres;
pub mod proxy;
pub mod s3;
pub mod sinks;
