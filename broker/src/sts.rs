//! AssumeRole behind a narrow trait, so the credential cache can be tested with a fake, and
//! the aws-sdk-sts implementation the broker runs with.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use meshiam_imds::Credentials;
use serde::Serialize;

use crate::clock::Clock;

/// Everything that changes the credentials STS hands out: the credential cache's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct AssumeRoleRequest {
    pub role_arn: String,
    pub session_name: String,
    #[serde(skip)]
    pub external_id: Option<String>,
    /// Sorted by key.
    pub tags: Vec<(String, String)>,
    pub source_identity: Option<String>,
    pub duration_secs: u32,
}

/// How an STS call failed. Carries no STS error text: only what an operator needs to act
/// and what decides the answer's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StsErrorKind {
    /// STS (or our own node-wide limit) says slow down.
    Throttled,
    /// STS refused: access denied, bad parameters, region disabled.
    Denied,
    /// STS unreachable or answering 5xx.
    Unavailable,
    /// No answer in time.
    Timeout,
}

impl StsErrorKind {
    pub fn label(self) -> &'static str {
        match self {
            StsErrorKind::Throttled => "throttled",
            StsErrorKind::Denied => "denied",
            StsErrorKind::Unavailable => "unavailable",
            StsErrorKind::Timeout => "timeout",
        }
    }

    /// Worth a node-wide backoff: the trouble is STS, not one role.
    pub fn is_systemic(self) -> bool {
        !matches!(self, StsErrorKind::Denied)
    }
}

/// An STS failure: its kind and a secret-free code (the AWS error code such as
/// `AccessDenied`, or a local description such as `dispatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsError {
    pub kind: StsErrorKind,
    pub code: String,
}

impl StsError {
    pub fn new(kind: StsErrorKind, code: impl Into<String>) -> Self {
        Self {
            kind,
            code: code.into(),
        }
    }
}

impl fmt::Display for StsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "STS {} ({})", self.kind.label(), self.code)
    }
}

impl std::error::Error for StsError {}

/// The STS calls the broker makes.
pub trait StsApi: Send + Sync + 'static {
    fn assume_role<'a>(
        &'a self,
        req: &'a AssumeRoleRequest,
    ) -> BoxFuture<'a, Result<Credentials, StsError>>;

    /// The ARN of the broker's own identity (GetCallerIdentity).
    fn caller_arn(&self) -> BoxFuture<'_, Result<String, StsError>>;
}

/// Which STS endpoint the broker calls (`--sts-endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StsEndpoint {
    /// `sts.<region>.amazonaws.com`: aws-sdk-sts's own default (kiam#190, #368).
    Regional,
    /// `sts.amazonaws.com` (signed for us-east-1) for the regions that had the global
    /// endpoint; regions opened later have only their regional one. kube2iam's default
    /// (without `--use-regional-sts-endpoint`).
    Global,
}

/// The SDK's endpoint rules with `UseGlobalEndpoint` set, which aws-sdk-sts otherwise never
/// sets (other SDKs' `AWS_STS_REGIONAL_ENDPOINTS=legacy`). An endpoint override still wins.
#[derive(Debug)]
pub struct GlobalStsEndpoint(aws_sdk_sts::config::endpoint::DefaultResolver);

impl Default for GlobalStsEndpoint {
    fn default() -> Self {
        // `DefaultResolver::default()` has no partitions: it resolves nothing.
        Self(aws_sdk_sts::config::endpoint::DefaultResolver::new())
    }
}

impl aws_sdk_sts::config::endpoint::ResolveEndpoint for GlobalStsEndpoint {
    fn resolve_endpoint<'a>(
        &'a self,
        params: &'a aws_sdk_sts::config::endpoint::Params,
    ) -> aws_sdk_sts::config::endpoint::EndpointFuture<'a> {
        use aws_sdk_sts::config::endpoint::{EndpointFuture, Params};
        let global = Params::builder()
            .set_region(params.region().map(str::to_string))
            .set_use_dual_stack(params.use_dual_stack())
            .set_use_fips(params.use_fips())
            .set_endpoint(params.endpoint().map(str::to_string))
            .use_global_endpoint(true)
            .build();
        match global {
            Ok(p) => EndpointFuture::new(async move { self.0.resolve_endpoint(&p).await }),
            Err(e) => EndpointFuture::ready(Err(e.into())),
        }
    }
}

/// aws-sdk-sts with the default credential chain, a regional endpoint (or the global one,
/// `--sts-endpoint global`) and the standard `AWS_ENDPOINT_URL_STS` override.
pub struct AwsSts {
    client: aws_sdk_sts::Client,
    clock: Clock,
}

impl AwsSts {
    /// Loads the SDK configuration. Fails when no region can be found: STS endpoints are
    /// regional (kiam#190, #368) and the global one is never used silently.
    pub async fn from_env(
        region: Option<String>,
        endpoint: StsEndpoint,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        use aws_config::BehaviorVersion;
        use aws_config::retry::RetryConfig;
        use aws_config::timeout::TimeoutConfig;

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // Our cache owns retries, backoff and the node-wide rate limit.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(timeout.min(Duration::from_secs(3)))
                    .operation_timeout(timeout)
                    .build(),
            );
        if let Some(r) = region {
            loader = loader.region(aws_config::Region::new(r));
        }
        let conf = loader.load().await;
        if conf.region().is_none() {
            anyhow::bail!(
                "no AWS region for STS: set --region (MESHIAM_REGION) or AWS_REGION, or run where the node's metadata service tells it"
            );
        }
        let mut sts_conf = aws_sdk_sts::config::Builder::from(&conf);
        if endpoint == StsEndpoint::Global {
            sts_conf = sts_conf.endpoint_resolver(GlobalStsEndpoint::default());
        }
        Ok(Self {
            client: aws_sdk_sts::Client::from_conf(sts_conf.build()),
            clock: Clock::System,
        })
    }

    pub fn region(&self) -> Option<String> {
        self.client.config().region().map(|r| r.to_string())
    }
}

fn classify_sdk_error<E>(
    err: &aws_sdk_sts::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> StsError
where
    E: aws_sdk_sts::error::ProvideErrorMetadata,
{
    use aws_sdk_sts::error::SdkError;
    match err {
        SdkError::TimeoutError(_) => StsError::new(StsErrorKind::Timeout, "timeout"),
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            StsError::new(StsErrorKind::Timeout, "dispatch-timeout")
        }
        SdkError::DispatchFailure(d) if d.is_io() => {
            StsError::new(StsErrorKind::Unavailable, "dispatch-io")
        }
        SdkError::DispatchFailure(_) => StsError::new(StsErrorKind::Unavailable, "dispatch"),
        SdkError::ResponseError(_) => StsError::new(StsErrorKind::Unavailable, "response"),
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("unknown").to_string();
            let status = s.raw().status().as_u16();
            let throttled = status == 429
                || matches!(
                    code.as_str(),
                    "Throttling" | "ThrottlingException" | "RequestLimitExceeded"
                );
            let kind = if throttled {
                StsErrorKind::Throttled
            } else if status >= 500 {
                StsErrorKind::Unavailable
            } else {
                StsErrorKind::Denied
            };
            StsError::new(kind, code)
        }
        _ => StsError::new(StsErrorKind::Unavailable, "sdk"),
    }
}

impl StsApi for AwsSts {
    fn assume_role<'a>(
        &'a self,
        req: &'a AssumeRoleRequest,
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        Box::pin(async move {
            let mut tags = Vec::with_capacity(req.tags.len());
            for (k, v) in &req.tags {
                let tag = aws_sdk_sts::types::Tag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .map_err(|_| StsError::new(StsErrorKind::Denied, "invalid-tag"))?;
                tags.push(tag);
            }
            let out = self
                .client
                .assume_role()
                .role_arn(&req.role_arn)
                .role_session_name(&req.session_name)
                .duration_seconds(req.duration_secs as i32)
                .set_external_id(req.external_id.clone())
                .set_source_identity(req.source_identity.clone())
                .set_tags(if tags.is_empty() { None } else { Some(tags) })
                .send()
                .await
                .map_err(|e| classify_sdk_error(&e))?;
            let c = out
                .credentials()
                .ok_or_else(|| StsError::new(StsErrorKind::Unavailable, "no-credentials"))?;
            let expiration = u64::try_from(c.expiration().secs()).unwrap_or(0);
            Ok(Credentials {
                access_key_id: c.access_key_id().to_string(),
                secret_access_key: c.secret_access_key().to_string(),
                token: c.session_token().to_string(),
                expiration,
                last_updated: self.clock.now(),
            })
        })
    }

    fn caller_arn(&self) -> BoxFuture<'_, Result<String, StsError>> {
        Box::pin(async move {
            let out = self
                .client
                .get_caller_identity()
                .send()
                .await
                .map_err(|e| classify_sdk_error(&e))?;
            out.arn()
                .map(str::to_string)
                .ok_or_else(|| StsError::new(StsErrorKind::Unavailable, "no-arn"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sts::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};

    async fn url(r: &dyn ResolveEndpoint, region: &str, endpoint: Option<&str>) -> String {
        let p = Params::builder()
            .region(region)
            .use_fips(false)
            .use_dual_stack(false)
            .set_endpoint(endpoint.map(str::to_string))
            .build()
            .unwrap();
        r.resolve_endpoint(&p).await.unwrap().url().to_string()
    }

    #[tokio::test]
    async fn regional_by_default_global_on_request() {
        let (regional, global) = (DefaultResolver::new(), GlobalStsEndpoint::default());
        // aws-sdk-sts's default: the regional endpoint, us-east-1 included.
        for region in ["us-east-1", "eu-west-1", "ap-east-1"] {
            assert_eq!(
                url(&regional, region, None).await,
                format!("https://sts.{region}.amazonaws.com")
            );
        }
        for region in ["us-east-1", "eu-west-1", "ap-southeast-2"] {
            assert_eq!(
                url(&global, region, None).await,
                "https://sts.amazonaws.com"
            );
        }
        // A region opened after the global endpoint has only its own.
        assert_eq!(
            url(&global, "ap-east-1", None).await,
            "https://sts.ap-east-1.amazonaws.com"
        );
        // AWS_ENDPOINT_URL_STS wins either way.
        assert_eq!(
            url(&global, "eu-west-1", Some("http://127.0.0.1:5000")).await,
            "http://127.0.0.1:5000"
        );
    }
}
