// libFuzzer target: the AMQP URL parser and redact_url, with the property the
// rest of the program relies on when it prints a URL: the password does not
// appear in redact_url's output nor in a parse error's message. The password
// is found here by a rule of its own (between the first ':' of the userinfo
// and the only '@'), not by the code under test, so a mistake there is
// caught. Hints are fixed text (they quote no input), so they are not
// checked: a password such as "password" is in them by chance.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "config/config.h"
#include "util/error.h"

namespace {

// The password of a URL of the plain shape scheme://USER:PASSWORD@REST with
// exactly one '@' and no '/' in USER; empty when the URL is of another shape
// or the password is too short to be told from the rest of the text.
std::string password_of(const std::string& url) {
  const auto scheme = url.find("://");
  const auto at = url.find('@');
  if (scheme == std::string::npos || at == std::string::npos || at < scheme ||
      url.find('@', at + 1) != std::string::npos) {
    return {};
  }
  const auto colon = url.find(':', scheme + 3);
  if (colon == std::string::npos || colon > at || url.find('/', scheme + 3) < colon) {
    return {};
  }
  std::string secret = url.substr(colon + 1, at - colon - 1);
  // The rest of the URL as redact_url prints it, the mask included: a
  // password such as "p://u:**" is found in "amqp://u:***" by chance.
  std::string others = url.substr(0, colon + 1) + "***" + url.substr(at);
  // Words of the parser's own messages: a password made of one of them
  // would show in any message, leaked or not.
  static const std::string k_fixed_text =
      "is not an AMQP URL; bad port in the AMQP URL; no host in the AMQP URL; bad percent-escape in the user "
      "password vhost of the AMQP URL";
  if (secret.size() < 4 || others.find(secret) != std::string::npos || k_fixed_text.find(secret) != std::string::npos) {
    return {};
  }
  return secret;
}

void require_hidden(const std::string& text, const std::string& secret, const char* where) {
  if (!secret.empty() && text.find(secret) != std::string::npos) {
    std::fprintf(stderr, "fuzz: the password shows in %s: %s\n", where, text.c_str());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string url(reinterpret_cast<const char*>(data), size);
  const std::string secret = password_of(url);
  require_hidden(lhpc::config::redact_url(url), secret, "redact_url's output");
  try {
    (void)lhpc::config::parse_amqp_url(url);
  } catch (const lhpc::Error& e) {
    // The same URL with the password masked: what its message holds of the
    // password-like text is the parser's own wording ("from 1 to 65535"), not a leak.
    std::string masked = url;
    if (!secret.empty()) {
      masked.replace(url.find(secret), secret.size(), std::string(secret.size(), '\x01'));
    }
    std::string fixed;
    try {
      (void)lhpc::config::parse_amqp_url(masked);
    } catch (const lhpc::Error& m) {
      fixed = m.what();
    }
    if (fixed.find(secret) == std::string::npos) {
      require_hidden(e.what(), secret, "a parse error");
    }
  }
  return 0;
}
