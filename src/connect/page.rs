//! The small HTML page a browser sees at the end of connecting (the loopback callback of
//! `refreshd connect`, the daemon's web connect): one template, its text escaped by one
//! escaper (`html-escape`), since a message may carry what a provider or a user sent.

/// A page titled `title` saying `message`, both escaped.
pub fn html_page(title: &str, message: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1><p>{b}</p></body></html>\n",
        t = escape(title),
        b = escape(message)
    )
}

/// Text made safe for an HTML element or a quoted attribute: `& < > " '` become entities.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    html_escape::encode_quoted_attribute(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_the_provider_sent() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;"
        );
        let page = html_page("<t>", "a & b");
        assert!(page.contains("<title>&lt;t&gt;</title>"), "{page}");
        assert!(page.contains("<p>a &amp; b</p>"), "{page}");
    }
}
