//! The built-in web console and the JavaScript client module, embedded in the binary.
//!
//! `/` (index.html), `/app.js`, `/app.css`, `/markdown.js` and `/client/chatgate.js` come from `web/` at
//! compile time: no files on disk, no build step. Each answer carries its content type,
//! `cache-control: no-cache` with a strong ETag (a hash of the embedded bytes, so a browser
//! revalidates cheaply and never keeps a stale console after an upgrade), and `nosniff`.

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: &'static str,
}

/// 64-bit FNV-1a of the bytes, for the ETag (const: computed at compile time).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"<16 hex digits>"` of the hash, as a quoted ETag.
const fn etag_bytes(hash: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[16 - i] = HEX[((hash >> (i * 4)) & 0xf) as usize];
        i += 1;
    }
    out
}

macro_rules! asset {
    ($name:ident, $path:literal, $content_type:literal) => {
        const $name: Asset = {
            const BODY: &str = include_str!($path);
            const TAG: [u8; 18] = etag_bytes(fnv1a(BODY.as_bytes()));
            Asset {
                body: BODY,
                content_type: $content_type,
                etag: match std::str::from_utf8(&TAG) {
                    Ok(tag) => tag,
                    Err(_) => panic!("ETag is ASCII"),
                },
            }
        };
    };
}

asset!(INDEX_HTML, "../../web/index.html", "text/html; charset=utf-8");
asset!(APP_JS, "../../web/app.js", "text/javascript; charset=utf-8");
asset!(APP_CSS, "../../web/app.css", "text/css; charset=utf-8");
asset!(MARKDOWN_JS, "../../web/markdown.js", "text/javascript; charset=utf-8");
asset!(CLIENT_JS, "../../web/chatgate.js", "text/javascript; charset=utf-8");

/// The console page's Content-Security-Policy: only its own scripts, styles and sockets.
const CONSOLE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn serve(asset: &Asset, request: &HeaderMap, csp: Option<&'static str>) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag || t.trim() == "*"));
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if let Some(csp) = csp {
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    }
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    (StatusCode::OK, headers, asset.body).into_response()
}

/// `GET /`: the console page.
pub async fn index(request: HeaderMap) -> Response {
    serve(&INDEX_HTML, &request, Some(CONSOLE_CSP))
}

/// `GET /app.js`: the console's script.
pub async fn app_js(request: HeaderMap) -> Response {
    serve(&APP_JS, &request, None)
}

/// `GET /app.css`: the console's styles.
pub async fn app_css(request: HeaderMap) -> Response {
    serve(&APP_CSS, &request, None)
}

/// `GET /markdown.js`: the console's Markdown renderer (DOM nodes only, never HTML).
pub async fn markdown_js(request: HeaderMap) -> Response {
    serve(&MARKDOWN_JS, &request, None)
}

/// `GET /client/chatgate.js`: the client module, for the console and other frontends.
pub async fn client_js(request: HeaderMap) -> Response {
    serve(&CLIENT_JS, &request, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_a_quoted_hex_hash_that_follows_the_content() {
        assert_eq!(etag_bytes(0x0123_4567_89ab_cdef), *b"\"0123456789abcdef\"");
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(INDEX_HTML.etag.len(), 18);
        assert_ne!(APP_JS.etag, CLIENT_JS.etag);
    }
}
